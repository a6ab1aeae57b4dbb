//! Where the database is, how to connect to it, and how to say where it is without the password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

use crate::Error;

/// A pool of connections, as the runtime's workers use it.
pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// How long a connection attempt may take before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL database and the schema the projector's tables live in.
///
/// Every connection made from it has `search_path` set to the schema, so the event store,
/// the checkpoints and the read models are all found there by their plain names.
/// `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    schema: String,
    target: String,
}

impl Database {
    /// Parses a connection string, as a URL (`postgres://user:secret@host:5432/db`) or as
    /// `key=value` pairs, with the tables in schema `public`.
    pub fn new(connection_string: &str) -> Result<Database, Error> {
        let mut config = postgres::Config::from_str(connection_string).map_err(|_| {
            Error::invalid_setting(
                "DATABASE_URL",
                redact(connection_string),
                "expected a URL such as postgres://user:password@localhost:5432/dbname",
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("projector");
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let target = describe(&config);
        let mut database = Database {
            config,
            schema: String::new(),
            target,
        };
        database.set_schema("public")?;
        Ok(database)
    }

    /// Uses `schema` for every table: the event store, the checkpoints and the read models.
    /// Schema names are letters, digits and underscores, not starting with a digit.
    pub fn schema(mut self, schema: &str) -> Result<Database, Error> {
        self.set_schema(schema)?;
        Ok(self)
    }

    fn set_schema(&mut self, schema: &str) -> Result<(), Error> {
        let valid = schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && schema.len() <= 63
            && schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::invalid_setting(
                "--schema",
                schema,
                "schema names are up to 63 letters, digits and underscores, not starting with a digit",
            ));
        }
        self.schema = schema.to_owned();
        self.config.options(&format!("-c search_path={schema}"));
        Ok(())
    }

    /// The schema the tables live in.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// Where the database is, as `user@host:port/dbname`, without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Opens one connection.
    pub fn connect(&self) -> Result<Client, Error> {
        self.config.connect(NoTls).map_err(|source| Error::Connect {
            target: self.target.clone(),
            source,
        })
    }

    /// A pool of at most `size` connections, opened lazily.
    pub fn pool(&self, size: u32) -> Pool {
        let manager = PostgresConnectionManager::new(self.config.clone(), NoTls);
        r2d2::Pool::builder()
            .max_size(size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(10))
            .build_unchecked(manager)
    }

    /// The channel appends notify, for this schema.
    pub(crate) fn channel(&self) -> String {
        format!("projector_events_{}", self.schema)
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .finish()
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema {})", self.target, self.schema)
    }
}

fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("(default user)");
    let dbname = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{dbname}")
}

/// Replaces the password of a connection string (URL or `key=value` form) with `***`.
///
/// ```
/// assert_eq!(
///     projector::redact("postgres://app:s3cret@db:5432/events"),
///     "postgres://app:***@db:5432/events"
/// );
/// assert_eq!(projector::redact("host=db password=s3cret"), "host=db password=***");
/// ```
pub fn redact(connection_string: &str) -> String {
    if let Some(scheme_end) = connection_string.find("://") {
        let rest_start = scheme_end + 3;
        let rest = &connection_string[rest_start..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let mut out = connection_string[..rest_start].to_owned();
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        out.push_str(&redact_query(&rest[authority_end..]));
        out
    } else {
        connection_string
            .split_whitespace()
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.trim() == "password" => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn redact_query(path_and_query: &str) -> String {
    match path_and_query.split_once('?') {
        None => path_and_query.to_owned(),
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_in_every_form() {
        assert_eq!(redact("postgres://u:p%40ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://h/db?password=x&sslmode=disable"),
            "postgres://h/db?password=***&sslmode=disable"
        );
        assert_eq!(
            redact("postgresql://u:a@b@h:1/db"),
            "postgresql://u:***@h:1/db"
        );
        assert_eq!(
            redact("user=u password=x host=h"),
            "user=u password=*** host=h"
        );
    }

    #[test]
    fn debug_and_display_do_not_show_the_password() {
        let database = Database::new("postgres://app:hunter2@localhost:5432/events").ok();
        let shown = format!(
            "{database:?} {}",
            database.as_ref().map(|d| d.to_string()).unwrap_or_default()
        );
        assert!(shown.contains("app@localhost:5432/events"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn schema_names_are_checked() {
        let database = Database::new("postgres://localhost/db").ok();
        assert!(
            database
                .clone()
                .and_then(|d| d.schema("tenant_1").ok())
                .is_some()
        );
        for bad in ["", "1abc", "a-b", "a b", "x\"; drop"] {
            assert!(
                database
                    .clone()
                    .map(|d| d.schema(bad).is_err())
                    .unwrap_or(false),
                "{bad:?}"
            );
        }
    }
}
