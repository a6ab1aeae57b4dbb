//! How the catch-up benchmark writes its figures, commands and SQL names.

/// `n` with thousands separated by commas.
pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `value` as a whole number with thousands separated, `n/a` when not finite.
pub(crate) fn thousands_f(value: f64) -> String {
    if value.is_finite() {
        thousands(value as i64)
    } else {
        "n/a".into()
    }
}

/// `1000000` as `1M`, `250000` as `250k`.
pub(crate) fn short_count(n: i64) -> String {
    if n >= 1_000_000 && n % 100_000 == 0 {
        let millions = n as f64 / 1e6;
        format!("{millions}M")
    } else if n >= 1_000 && n % 1_000 == 0 {
        format!("{}k", n / 1_000)
    } else {
        thousands(n)
    }
}

pub(crate) fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1} MiB"))
}

pub(crate) fn pass(passed: bool) -> &'static str {
    if passed { "PASS" } else { "FAIL" }
}

/// `url` with its password replaced by `***` (URL or `key=value` form).
pub(crate) fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        return match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}:***@{host}{tail}")
            }
            _ => url.to_owned(),
        };
    }
    url.split_whitespace()
        .map(|word| match word.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name` as a quoted SQL identifier.
pub(crate) fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `word` quoted for a POSIX shell where needed.
pub(crate) fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
