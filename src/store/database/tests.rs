use super::*;

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
fn a_raw_at_sign_in_a_url_password_is_refused_and_an_encoded_one_taken() {
    for refused in [
        "postgres://app:p@ss@db/x",
        "postgresql://app:p@ss/x@db/x",
        "postgres://app:a?b@c@db/x",
        "postgres://db/x?user=me@corp",
        "postgres://db/x?password=secret&user=me@corp",
        "postgres://db?password=secret@x",
        "postgres://db/x@y",
    ] {
        assert!(misplaced_at_sign(refused).is_some(), "{refused}");
    }
    for taken in [
        "postgres://app:p%40ss@db/x",
        "postgres://db/x?user=me%40corp",
        "postgres://app:p/s?s@db/x",
        "postgres://app@db/x?options=-c%20a%3Db",
        "host=db password=p@ss@x",
    ] {
        assert!(misplaced_at_sign(taken).is_none(), "{taken}");
    }
}

#[test]
fn parse_failures_name_no_part_of_the_string() {
    for (string, expected) in [
        (
            "host=db password=se cret",
            "it ends where a value or an '='",
        ),
        (
            "host=db password=se cret user=x",
            "a key is not followed by '='",
        ),
        (
            "host=db password=se cret=x",
            "it holds an unknown option (not shown",
        ),
        (
            "host=db sslrootcert=x",
            "option 'sslrootcert' is not supported",
        ),
        ("host=db port=se", "the value of option 'port' is invalid"),
        ("host=db password='secret", "a quoted value is not closed"),
        ("postgres://db/x?secret", "a URL parameter has no '='"),
    ] {
        match Database::new(string) {
            Err(error) => {
                let shown = error.to_string();
                assert!(shown.contains(expected), "{string}: {shown}");
                assert!(!shown.contains("cret") && !shown.contains("=se"), "{shown}");
            }
            Ok(_) => panic!("{string} parsed"),
        }
    }
}

#[test]
fn schema_names_are_checked() {
    let database = Database::new("postgres://localhost/db").ok();
    for good in ["tenant_1", "TenantA", &"x".repeat(63)] {
        assert!(
            database.clone().and_then(|d| d.schema(good).ok()).is_some(),
            "{good}"
        );
    }
    for bad in ["", "1abc", "a-b", "a b", "x\"; drop", &"x".repeat(64)] {
        assert!(
            database
                .clone()
                .map(|d| d.schema(bad).is_err())
                .unwrap_or(false),
            "{bad:?}"
        );
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Characters of generated passwords: every character that means something in a URL
    /// or a `key=value` string, quotes, spaces (an em space too), backslashes, unicode, and
    /// letters (q, x, j) and symbols that no message of the projector spells next to each
    /// other, so that a fragment found in the output can only come from the password.
    const ALPHABET: &[char] = &[
        'q', 'x', 'j', 'Q', 'X', 'J', '@', ':', '/', '?', '#', '%', '&', '=', '+', '\'', '"', ' ',
        '\u{2003}', '\\', 'é', 'ß', '€', 'ж', '😀',
    ];

    fn password() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(ALPHABET), 4..24)
            .prop_map(|chars| chars.into_iter().collect())
    }

    /// Every byte but the unreserved ones as `%XX`.
    fn percent_encoded(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// A `key=value` value in quotes, with quotes and backslashes escaped.
    fn quoted(text: &str) -> String {
        format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    /// The ways a password gets into a connection string: well-formed (`true`: it must
    /// parse, with exactly this password) or as a careless person writes it.
    fn forms(password: &str) -> Vec<(bool, String)> {
        let encoded = percent_encoded(password);
        vec![
            (true, format!("postgres://app:{encoded}@db:5432/events")),
            (
                true,
                format!("postgresql://app@db/events?password={encoded}&port=5433"),
            ),
            (
                true,
                format!(
                    "host=db user=app password={} dbname=events",
                    quoted(password)
                ),
            ),
            (
                true,
                format!(
                    "host=db user=app dbname=events password = {}",
                    quoted(password)
                ),
            ),
            (false, format!("postgres://app:{password}@db:5432/events")),
            (
                false,
                format!("postgres://app:{password}@db/events?sslmode=disable"),
            ),
            (
                false,
                format!("postgres://db/events?user=app&password={password}"),
            ),
            (
                false,
                format!("host=db user=app password={password} dbname=events"),
            ),
            (
                false,
                format!("host=db user=app dbname=events password={password}"),
            ),
            (
                false,
                format!("host=db user=app password='{password}' dbname=events"),
            ),
            (false, format!("host=db password = {password}")),
            (false, format!("password={password}")),
        ]
    }

    /// The password's fragments of 4 characters or more that `shown` holds; a fragment of
    /// symbols and spaces alone (`'@' `) is also a word of the messages, so not counted.
    fn fragments_in(password: &str, shown: &str) -> Vec<String> {
        let chars: Vec<char> = password.chars().collect();
        chars
            .windows(4)
            .map(|window| window.iter().collect::<String>())
            .filter(|fragment| fragment.chars().any(|c| c.is_alphanumeric()))
            .filter(|fragment| shown.contains(fragment.as_str()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_schema_name_is_taken_exactly_or_refused_naming_the_flag_and_value(
            name in prop_oneof!["[A-Za-z_][A-Za-z0-9_]{0,70}", "[a-z\"'; \\\\$-]{0,12}", any::<String>()],
        ) {
            let database = Database::new("postgres://app@db/events");
            prop_assert!(database.is_ok());
            match database.and_then(|d| d.schema(&name)) {
                Ok(database) => {
                    prop_assert!(name.len() <= 63 && !name.starts_with(|c: char| c.is_ascii_digit()));
                    prop_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                    prop_assert_eq!(database.schema_name(), name.as_str());
                    let options = database.config.get_options().unwrap_or_default();
                    prop_assert!(options.ends_with(&format!(" -c search_path=\"{name}\"")), "{}", options);
                }
                Err(Error::InvalidSetting { setting, value, .. }) => {
                    prop_assert_eq!(setting, "Database::schema");
                    prop_assert_eq!(value, name);
                }
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn no_output_holds_any_fragment_of_the_password(password in password()) {
            for (well_formed, string) in forms(&password) {
                let shown = match Database::from_setting("DATABASE_URL", &string)
                    .and_then(|d| d.schema("tenant_1"))
                {
                    Ok(database) => {
                        if well_formed {
                            prop_assert_eq!(
                                database.config.get_password(),
                                Some(password.as_bytes()),
                                "{}", string
                            );
                        }
                        format!("{database} {database:?} {}", database.target())
                    }
                    Err(error) => {
                        prop_assert!(!well_formed, "{string}: {error}");
                        let refused = matches!(error, Error::InvalidConnectionString { .. });
                        prop_assert!(refused, "{error:?}");
                        format!("{error} {error:?} {}", crate::error_chain(&error))
                    }
                };
                let leaked = fragments_in(&password, &shown);
                prop_assert!(leaked.is_empty(), "{string:?} shows {leaked:?}: {shown}");
            }
        }
    }
}

#[test]
fn the_users_options_come_before_the_schema_and_after_the_keepalives() {
    let database = Database::new("postgres://db/x?options=-c%20statement_timeout%3D5")
        .and_then(|d| d.schema("TenantA"));
    let options = database
        .as_ref()
        .ok()
        .and_then(|d| d.config.get_options())
        .unwrap_or_default();
    assert_eq!(
        options,
        "-c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
         -c tcp_user_timeout=30000 -c statement_timeout=5 -c search_path=\"TenantA\""
    );
}
