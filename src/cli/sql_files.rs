//! `--projection-file`: projections written in SQL, from files or folders of them.

use std::path::{Path, PathBuf};

use projector::projections::SqlProjection;
use projector::{Database, Error, Projection};

/// The projections of the files given with `--projection-file`, each parsed (nothing is sent
/// to the database yet): a folder stands for every `*.sql` file in it, sorted by name.
pub(crate) fn projection_files(paths: &[String]) -> Result<Vec<SqlProjection>, Error> {
    let mut projections = Vec::new();
    for given in paths {
        let path = Path::new(given);
        if path.is_dir() {
            let files = sql_files_in(path)?;
            if files.is_empty() {
                return Err(Error::invalid_setting(
                    "--projection-file",
                    given,
                    "the folder holds no *.sql file: give a folder of projection files, or one \
                     file",
                ));
            }
            for file in files {
                projections.push(SqlProjection::from_file(file)?);
            }
        } else {
            projections.push(SqlProjection::from_file(path)?);
        }
    }
    defined_once(&projections)?;
    Ok(projections)
}

/// Refuses two files that define the same version of a projection, naming both (two versions
/// of one projection may run side by side).
fn defined_once(projections: &[SqlProjection]) -> Result<(), Error> {
    for (at, projection) in projections.iter().enumerate() {
        if let Some(first) = projections[..at].iter().find(|earlier| {
            earlier.name() == projection.name() && earlier.version() == projection.version()
        }) {
            return Err(Error::invalid_setting(
                "--projection-file",
                projection.path(),
                format!(
                    "projection '{}' is defined here and in {} (or the file is given twice): \
                     each version of a projection may be defined once",
                    projector::stored_name(projection.name(), projection.version()),
                    first.path()
                ),
            ));
        }
    }
    Ok(())
}

/// The `*.sql` entries directly in `folder`, sorted by name. Each is read as a file: a broken
/// link or a folder named `*.sql` is refused when read, rather than skipped without a word.
fn sql_files_in(folder: &Path) -> Result<Vec<PathBuf>, Error> {
    let unreadable = |error: std::io::Error| {
        Error::invalid_setting(
            "--projection-file",
            folder.display(),
            format!("the folder cannot be read ({error})"),
        )
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        if path.extension().is_some_and(|ext| ext == "sql") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Checks every file against the database (setup, then apply over an empty batch, rolled
/// back), so that a file the database refuses stops the start before anything is applied.
pub(crate) fn check(database: &Database, projections: &[SqlProjection]) -> Result<(), Error> {
    if projections.is_empty() {
        return Ok(());
    }
    let mut client = database.connect()?;
    projections
        .iter()
        .try_for_each(|projection| projection.check(&mut client))
}

/// The projection `projector reset --projection-file FILE` resets: parsed, checked, and with a
/// `-- reset` section (without one, rebuilding would apply every event again on top of the
/// read model).
pub(crate) fn for_reset(
    client: &mut projector::postgres::Client,
    file: &str,
) -> Result<SqlProjection, Error> {
    let projection = SqlProjection::from_file(file)?;
    if !projection.has_reset() {
        return Err(Error::SqlProjectionFile {
            file: file.to_owned(),
            section: Some("reset".into()),
            line: None,
            reason: "the file has no `-- reset` section, so its read model cannot be cleared: \
                     add one (such as `TRUNCATE my_table;`) and run the reset again"
                .into(),
        });
    }
    projection.check(client)?;
    Ok(projection)
}
