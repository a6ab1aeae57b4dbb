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

/// The default bound on how long a dead connection goes unnoticed, in seconds.
const KEEPALIVE_TIMEOUT_SECS: u32 = 30;

/// The bounds [`Database::keepalive_timeout_secs`] and [`Database::session_timeout_secs`]
/// accept, in seconds.
const TIMEOUT_RANGE: std::ops::RangeInclusive<u32> = 5..=86_400;

/// The default bound on how long a paused or cut-off process keeps its partitions, in seconds.
const SESSION_TIMEOUT_SECS: u32 = 60;

/// Unanswered keepalive probes after which a connection counts as dead.
const KEEPALIVE_PROBES: u32 = 3;

/// A notification channel of the schema, as SQL over `current_schema()`: the prefix and the
/// schema's name when the whole fits PostgreSQL's 63-byte limit on names, else the prefix and
/// the schema's MD5. With no prefix, the channel appends notify and fetchers listen on
/// (`projector_events_`); with `"projector_applied_"`, the one a worker's commit notifies and
/// [`wait_for`](crate::wait_for) listens on. Both ends use this one expression, so they always
/// agree.
macro_rules! notify_channel {
    () => {
        $crate::store::database::notify_channel!("projector_events_")
    };
    ($prefix:literal) => {
        concat!(
            "(CASE WHEN octet_length('",
            $prefix,
            "' || current_schema()) <= 63 THEN '",
            $prefix,
            "' || current_schema() ELSE '",
            $prefix,
            "' || md5(current_schema()) END)"
        )
    };
}
pub(crate) use notify_channel;

/// A PostgreSQL database and the schema the projector's tables live in.
///
/// Every connection made from it has `search_path` set to the schema, so the event store,
/// the checkpoints and the read models are all found there by their plain names.
/// `Debug` and `Display` never show the password, and neither does any error: a connection
/// string is described only by the user, host, port and database the driver read from it.
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    /// The startup `options` of the connection string, kept ahead of the projector's own.
    user_options: Option<String>,
    schema: String,
    keepalive_timeout_secs: u32,
    session_timeout_secs: u32,
    target: String,
    /// Where the connection string came from, such as `DATABASE_URL`.
    setting: String,
}

impl Database {
    /// Parses a connection string, as a URL (`postgres://user:secret@host:5432/db`) or as
    /// `key=value` pairs, with the tables in schema `public`.
    ///
    /// A password holding `@` must be percent-encoded in a URL (`%40`). When the string cannot
    /// be used, the error says why without quoting any part of it.
    pub fn new(connection_string: &str) -> Result<Database, Error> {
        Database::from_setting("the connection string", connection_string)
    }

    /// As [`new`](Self::new), naming in errors the setting the string came from (such as
    /// `--database-url` or `DATABASE_URL`).
    pub fn from_setting(setting: &str, connection_string: &str) -> Result<Database, Error> {
        let invalid = |reason: String| Error::InvalidConnectionString {
            setting: setting.to_owned(),
            reason,
        };
        if let Some(reason) = misplaced_at_sign(connection_string) {
            return Err(invalid(reason.to_owned()));
        }
        let mut config = postgres::Config::from_str(connection_string)
            .map_err(|error| invalid(parse_failure(&error)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            // The process id lets an operator go from `pg_stat_activity` (and `status`) to
            // the process holding a partition.
            config.application_name(&format!("projector pid {}", std::process::id()));
        }
        let target = describe(&config);
        let mut database = Database {
            user_options: config.get_options().map(str::to_owned),
            config,
            schema: "public".to_owned(),
            keepalive_timeout_secs: KEEPALIVE_TIMEOUT_SECS,
            session_timeout_secs: SESSION_TIMEOUT_SECS,
            target,
            setting: setting.to_owned(),
        };
        database.apply_settings();
        Ok(database)
    }

    /// Uses `schema` for every table: the event store, the checkpoints and the read models.
    /// Schema names are up to 63 letters, digits and underscores, not starting with a digit,
    /// and are case-sensitive: `TenantA` is not `tenanta`.
    pub fn schema(mut self, schema: &str) -> Result<Database, Error> {
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
                "Database::schema",
                schema,
                "schema names are up to 63 letters, digits and underscores, not starting with a digit",
            ));
        }
        self.schema = schema.to_owned();
        self.apply_settings();
        Ok(self)
    }

    /// Bounds how long a connection to a server that vanished without closing it (a host or
    /// network gone silent) goes unnoticed, on both ends: TCP keepalives and the TCP user
    /// timeout of the projector's connections, and of the server's side of them (so the server
    /// releases a dead process's partitions, and a standby takes over, within about this
    /// bound). From 5 to 86,400 seconds; default 30. Options of the same names given in the
    /// connection string's `options` win over it on the server side.
    pub fn keepalive_timeout_secs(mut self, seconds: u32) -> Result<Database, Error> {
        self.keepalive_timeout_secs =
            timeout_within_bounds("Database::keepalive_timeout_secs", seconds)?;
        self.apply_settings();
        Ok(self)
    }

    /// Bounds how long a process that stops answering while its connections stay open (paused
    /// with SIGSTOP, a frozen VM, a network that holds the connection without passing data)
    /// keeps its partitions: the server ends a worker's session that stays idle, or idle in a
    /// transaction, for this long, which releases its partition and row locks, so that a
    /// standby takes over. Live workers talk to the server every second, so only a process
    /// that has stopped is ended; a projection must not keep its transaction idle (computing
    /// without a statement) for this long. From 5 to 86,400 seconds; default 60. Needs
    /// PostgreSQL 14 or later. Options of the same names in the connection string's `options`
    /// win over it.
    pub fn session_timeout_secs(mut self, seconds: u32) -> Result<Database, Error> {
        self.session_timeout_secs =
            timeout_within_bounds("Database::session_timeout_secs", seconds)?;
        Ok(self)
    }

    /// Sets the keepalives and the startup options from the settings: the projector's
    /// keepalive options first, then the user's own options (which win over them), then the
    /// schema (which wins over any `search_path` of the user's).
    fn apply_settings(&mut self) {
        let timeout = self.keepalive_timeout_secs;
        let idle = (timeout / 2).max(1);
        let interval = ((timeout - idle) / KEEPALIVE_PROBES).max(1);
        self.config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(idle.into()))
            .keepalives_interval(Duration::from_secs(interval.into()))
            .keepalives_retries(KEEPALIVE_PROBES)
            .tcp_user_timeout(Duration::from_secs(timeout.into()));
        let mut options = format!(
            "-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} \
             -c tcp_keepalives_count={KEEPALIVE_PROBES} -c tcp_user_timeout={}",
            u64::from(timeout) * 1000
        );
        if let Some(user) = &self.user_options {
            options.push(' ');
            options.push_str(user);
        }
        // Quoted, so that the name is taken exactly; `schema` holds no quote or space.
        options.push_str(&format!(" -c search_path=\"{}\"", self.schema));
        self.config.options(&options);
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
        self.connect_with(&self.config)
    }

    /// Opens one connection that the server ends as it ends a worker's (see
    /// [`pool`](Self::pool)): for a connection whose session must not outlive a frozen process,
    /// such as the one holding a process's membership among those sharing partitions.
    pub(crate) fn connect_watched(&self) -> Result<Client, Error> {
        self.connect_with(&self.watched_config())
    }

    /// The connection settings with the session timeout and the client check.
    fn watched_config(&self) -> postgres::Config {
        let timeout = self.session_timeout_secs;
        let mut config = self.config.clone();
        config.options(&format!(
            "-c idle_session_timeout={timeout}s -c idle_in_transaction_session_timeout={timeout}s \
             -c client_connection_check_interval={}s {}",
            timeout.min(5),
            self.config.get_options().unwrap_or_default()
        ));
        config
    }

    fn connect_with(&self, config: &postgres::Config) -> Result<Client, Error> {
        config.connect(NoTls).map_err(|source| {
            let target = self.target.clone();
            let setting = self.setting.clone();
            match source.code().map(|code| code.code()) {
                // invalid_password, invalid_authorization_specification (unknown role, a role
                // that may not log in, no pg_hba.conf entry).
                Some("28P01" | "28000") => Error::LoginRefused {
                    target,
                    setting,
                    source,
                },
                // invalid_catalog_name
                Some("3D000") => Error::NoSuchDatabase {
                    target,
                    setting,
                    source,
                },
                _ => Error::Connect { target, source },
            }
        })
    }

    /// A pool of at most `size` connections, opened lazily, for the workers: the server ends
    /// their sessions once idle for the [session timeout](Self::session_timeout_secs), and
    /// looks for a vanished client every few seconds while a statement runs.
    pub fn pool(&self, size: u32) -> Pool {
        let manager = PostgresConnectionManager::new(self.watched_config(), NoTls);
        r2d2::Pool::builder()
            // The workers report a failed connection themselves, once per outage (see
            // `outage`); r2d2's default handler would log every attempt at error level.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .max_size(size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(10))
            .build_unchecked(manager)
    }

    /// The statement that listens on the channel appends notify, for this schema.
    pub(crate) fn listen_statement(&self) -> &'static str {
        concat!(
            "DO $$ BEGIN EXECUTE format('LISTEN %I', ",
            notify_channel!(),
            "); END $$"
        )
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .field("keepalive_timeout_secs", &self.keepalive_timeout_secs)
            .field("session_timeout_secs", &self.session_timeout_secs)
            .finish()
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema {})", self.target, self.schema)
    }
}

/// `user@host:port/dbname`, from what the driver parsed (never from the string itself).
/// `seconds` for `setting`, if within [`TIMEOUT_RANGE`].
fn timeout_within_bounds(setting: &str, seconds: u32) -> Result<u32, Error> {
    if TIMEOUT_RANGE.contains(&seconds) {
        return Ok(seconds);
    }
    Err(Error::invalid_setting(
        setting,
        seconds,
        format!(
            "expected a whole number of seconds from {} to {}",
            TIMEOUT_RANGE.start(),
            TIMEOUT_RANGE.end()
        ),
    ))
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

/// Why a URL is refused before parsing: the driver ends the credentials at the first `@`
/// wherever it is, so a password holding a raw `@` would leave its tail in the host (or the
/// database name), and an `@` in the path or the parameters (`?password=secret&user=me@corp`)
/// would make the user name of everything before it; both are then printed. `None` for a URL
/// without that problem and for `key=value` strings.
fn misplaced_at_sign(connection_string: &str) -> Option<&'static str> {
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| connection_string.strip_prefix(scheme))?;
    let (credentials, after_credentials) = rest.split_once('@')?;
    // The driver reads the user name up to the first ':', and shows it.
    let user = credentials
        .split_once(':')
        .map_or(credentials, |(user, _)| user);
    if user.contains(['/', '?']) {
        return Some(
            "the URL holds an '@' after its host, in its path or parameters: write an '@' \
             there (as in user=me@corp) as %40 (percent-encoded)",
        );
    }
    let before_parameters = after_credentials
        .split_once('?')
        .map_or(after_credentials, |(head, _)| head);
    before_parameters.contains('@').then_some(
        "the URL holds more than one '@' before its host: write an '@' in the user name or \
         password as %40 (percent-encoded)",
    )
}

/// Option names of libpq that this driver does not take: naming one in an error reveals
/// nothing, whereas an unknown word may be part of a value (an unquoted password with a space).
const LIBPQ_ONLY_OPTIONS: [&str; 22] = [
    "passfile",
    "require_auth",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "sslcertmode",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requirepeer",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "fallback_application_name",
    "client_encoding",
];

/// The driver's reason a connection string did not parse, in words that hold no part of the
/// string: a reason the driver words with a piece of the string is reworded without it, and
/// one not recognised here is not shown.
fn parse_failure(error: &postgres::Error) -> String {
    let cause = std::error::Error::source(error)
        .map(ToString::to_string)
        .unwrap_or_default();
    const QUOTE: &str = "quote a value holding spaces, as password='a b'";
    if let Some(option) = cause
        .strip_prefix("unknown option `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return match LIBPQ_ONLY_OPTIONS.contains(&option) {
            true => format!("option '{option}' is not supported"),
            false => format!(
                "it holds an unknown option (not shown, as it may be part of a value: {QUOTE})"
            ),
        };
    }
    if let Some(option) = cause
        .strip_prefix("invalid value for option `")
        .and_then(|rest| rest.strip_suffix('`'))
        .filter(|option| option.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    {
        return format!("the value of option '{option}' is invalid");
    }
    if let Some(byte) = cause
        .strip_prefix("unexpected character at byte ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|byte| byte.parse::<usize>().ok())
    {
        return format!("a key is not followed by '=' (at byte {byte}): {QUOTE}");
    }
    match cause.as_str() {
        "unexpected EOF" => format!("it ends where a value or an '=' was expected: {QUOTE}"),
        "unterminated quoted connection parameter value" => "a quoted value is not closed".into(),
        "unterminated parameter" => "a URL parameter has no '='".into(),
        _ if cause.contains("utf-8") => "a percent-encoded part is not valid UTF-8".into(),
        _ => "the driver could not parse it".into(),
    }
}

#[cfg(test)]
mod tests;
