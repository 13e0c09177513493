//! Loading a config file and reporting every problem in it.
//!
//! serde stops at the first error. To report all of them, the document is
//! parsed once with spans, then deserialized repeatedly: each failure is
//! recorded with its place in the file, the offending key (or array
//! element) is removed from the document, and deserialization is tried
//! again, until it succeeds. The semantic checks then run on the result.
//! Filter options get the same treatment when the filters are built (see
//! `pipeline`).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Config;

/// Problems found by deserializing before the rest are left unlisted.
const MAX_PROBLEMS: usize = 100;

/// One problem in a config file, at a line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub column: usize,
    /// Dotted path of the offending key, e.g. `server.bind`, when there is one.
    pub key: Option<String>,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems {
    /// The file the problems are in (empty for text parsed directly).
    pub path: PathBuf,
    /// The problems, in the order they were found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(f, "{}: {count} problem{}", self.path.display(), if count == 1 { "" } else { "s" })?;
        for problem in &self.problems {
            writeln!(f, "  {}:{problem}", self.path.display())?;
        }
        Ok(())
    }
}

/// Reads and loads the config file at `path`.
pub fn load_file(path: &Path) -> Result<Config, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| Problems {
        path: path.to_owned(),
        problems: vec![Problem { line: 1, column: 1, key: None, message: format!("cannot read the file: {e}") }],
    })?;
    parse(&text).map_err(|problems| Problems { path: path.to_owned(), problems })
}

/// Loads a config from TOML text, returning every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    parse_then(text, |_| Ok(())).map(|(config, ())| config)
}

/// Loads a config from TOML text, then runs `build` on it (for what only
/// building can check, such as filter options). `build` reports problems as
/// `(dotted path, message)`, e.g. `("filters[2].rules[0].regex", …)`; each is
/// placed at the line and column of that key (or of its nearest enclosing
/// key present in the file). Every problem found is returned.
pub fn parse_then<T>(
    text: &str,
    build: impl FnOnce(&Config) -> Result<T, Vec<(String, String)>>,
) -> Result<(Config, T), Vec<Problem>> {
    let (mut doc, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        let mut problems: Vec<Problem> = syntax_errors
            .iter()
            .map(|e| Problem::at(text, e.span().map_or(0, |s| s.start), None, e.message()))
            .collect();
        problems.sort_by_key(|p| (p.line, p.column));
        return Err(problems);
    }

    let mut problems = Vec::new();
    // Keys are named as in the file: indices count the elements written,
    // not those left after removing the ones found wrong.
    let original = doc.clone();
    let config = loop {
        let deserializer = toml::de::Deserializer::from(doc.clone());
        match Config::deserialize(deserializer) {
            Ok(config) => break Some(config),
            Err(e) => {
                let start = e.span().map_or(0, |s| s.start);
                let key = e.span().and_then(|span| path_at(original.get_ref(), &span));
                let removed = e.span().is_some_and(|span| remove_entry_at(doc.get_mut(), &span));
                problems.push(Problem::at(text, start, key, e.message()));
                if !removed || problems.len() >= MAX_PROBLEMS {
                    // Nothing left to remove: further attempts would repeat
                    // this error. Or enough to act on: each attempt costs a
                    // pass over the document (a long list of wrong numbers
                    // must not take quadratic time).
                    break None;
                }
            }
        }
    };

    let mut place = |key: &str, message: &str| {
        let start = key_span(doc.get_ref(), key).map_or(0, |s| s.start);
        problems.push(Problem::at(text, start, Some(key.to_owned()), message));
    };
    let built = match &config {
        Some(config) => {
            for (key, message) in config.semantic_problems() {
                place(&key, &message);
            }
            for (key, message) in config.store.problems(|key| has_key(doc.get_ref(), key)) {
                place(&key, &message);
            }
            match build(config) {
                Ok(built) => Some(built),
                Err(build_problems) => {
                    for (key, message) in build_problems {
                        place(&key, &message);
                    }
                    None
                }
            }
        }
        None => None,
    };
    problems.sort_by_key(|p| (p.line, p.column));
    match (config, built) {
        (Some(config), Some(built)) if problems.is_empty() => Ok((config, built)),
        _ => Err(problems),
    }
}

impl Problem {
    fn at(text: &str, offset: usize, key: Option<String>, message: &str) -> Self {
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Self { line, column, key, message: message.trim().to_owned() }
    }
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Whether `outer` contains `span`.
fn contains(outer: &Range<usize>, span: &Range<usize>) -> bool {
    outer.start <= span.start && span.end <= outer.end
}

/// The dotted path (`server.trusted_proxies[1]`, `filters[2].rooms`) of the
/// innermost entry or array element whose key or value contains `span`.
/// Tables (whose spans cover only their headers) and arrays are searched
/// entry by entry, element by element.
fn path_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        let inner = path_in(value.get_ref(), span).map(|path| format!("{}{path}", key.get_ref()));
        inner.or_else(|| {
            (contains(&key.span(), span) || contains(&value.span(), span)).then(|| key.get_ref().to_string())
        })
    })
}

/// [`path_at`] inside a value, as a suffix: `.key…` or `[index]…`.
fn path_in(value: &DeValue<'_>, span: &Range<usize>) -> Option<String> {
    match value {
        DeValue::Table(inner) => path_at(inner, span).map(|path| format!(".{path}")),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let inner = path_in(item.get_ref(), span).map(|path| format!("[{i}]{path}"));
            inner.or_else(|| contains(&item.span(), span).then(|| format!("[{i}]")))
        }),
        _ => None,
    }
}

/// Removes what [`path_at`] finds: the innermost entry or array element
/// containing `span`. Returns whether something was removed.
fn remove_entry_at(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let mut found = None;
    for (key, value) in table.iter_mut() {
        if remove_in(value.get_mut(), span) {
            return true;
        }
        if contains(&key.span(), span) || contains(&value.span(), span) {
            found = Some(key.get_ref().to_string());
            break;
        }
    }
    found.is_some_and(|name| table.remove(name.as_str()).is_some())
}

/// [`remove_entry_at`] inside a value.
fn remove_in(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(inner) => remove_entry_at(inner, span),
        DeValue::Array(items) => {
            for i in 0..items.len() {
                let item = &mut items.as_mut()[i];
                if remove_in(item.get_mut(), span) {
                    return true;
                }
                if contains(&item.span(), span) {
                    // `DeArray` has no `remove`; only parsing reads its other field.
                    let all = std::mem::replace(items, toml::de::DeArray::new());
                    *items = all.into_iter().enumerate().filter(|(j, _)| *j != i).map(|(_, item)| item).collect();
                    return true;
                }
            }
            false
        }
        _ => false,
    }
}

/// The span of the key at a dotted path such as `filters[2].rules[0].regex`,
/// or of its nearest enclosing key present in the file.
fn key_span(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let (head, rest) = split_path(path);
    let (name, index) = match head.split_once('[') {
        Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()),
        None => (head, None),
    };
    let (key, mut value): (&Spanned<_>, &Spanned<DeValue<'_>>) = table.get_key_value(name)?;
    if let Some(index) = index {
        match value.get_ref() {
            DeValue::Array(items) => match items.get(index) {
                Some(item) => value = item,
                None => return Some(key.span()),
            },
            _ => return Some(key.span()),
        }
    }
    // For an element of an array of tables, its own span (its `[[…]]`
    // header) is a better fallback than the array's first key.
    let fallback = if index.is_some() { value.span() } else { key.span() };
    match (rest, value.get_ref()) {
        (Some(rest), DeValue::Table(inner)) => key_span(inner, rest).or(Some(fallback)),
        _ => Some(fallback),
    }
}

/// Whether the file sets the key at a dotted path of tables, such as
/// `store.path`.
fn has_key(table: &DeTable<'_>, path: &str) -> bool {
    let (head, rest) = split_path(path);
    match (table.get(head).map(Spanned::get_ref), rest) {
        (Some(DeValue::Table(inner)), Some(rest)) => has_key(inner, rest),
        (Some(_), None) => true,
        _ => false,
    }
}

/// Splits `a[1].b.c` into `a[1]` and `b.c`.
fn split_path(path: &str) -> (&str, Option<&str>) {
    match path.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (path, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").expect("an empty file is valid");
        assert_eq!(config.server.bind.port(), 8080);
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let text = "[server]\nbnd = \"x\"\n\n[limits]\nmax_frame_bytes = \"big\"\noutbound_queue = 0\n";
        let problems = parse(text).expect_err("three mistakes");
        let summary: Vec<_> = problems.iter().map(|p| (p.line, p.column, p.key.clone().unwrap_or_default())).collect();
        assert_eq!(
            summary,
            vec![
                (2, 1, "server.bnd".to_owned()),
                (5, 19, "limits.max_frame_bytes".to_owned()),
                (6, 1, "limits.outbound_queue".to_owned()),
            ],
            "{problems:#?}"
        );
        assert!(problems[0].message.contains("unknown field `bnd`"), "{}", problems[0]);
    }

    #[test]
    fn every_wrong_element_of_a_list_is_reported_at_its_place() {
        let problems =
            parse("[server]\ntrusted_proxies = [\"a\", \"10.0.0.1\", \"b\"]\n").expect_err("two bad entries");
        let summary: Vec<_> = problems.iter().map(|p| (p.line, p.column, p.key.clone().unwrap_or_default())).collect();
        assert_eq!(
            summary,
            vec![(2, 20, "server.trusted_proxies[0]".to_owned()), (2, 37, "server.trusted_proxies[2]".to_owned())],
            "indices count the elements as written: {problems:#?}"
        );
    }

    #[test]
    fn reports_every_syntax_error() {
        let problems = parse("a = \"unterminated\nb = 1\nc = ]\n").expect_err("two syntax errors");
        let lines: Vec<_> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [1, 3], "{problems:#?}");
    }

    #[test]
    fn build_problems_point_into_arrays_of_tables() {
        let text = "[[filters]]\nkind = \"a\"\n\n[[filters]]\nkind = \"b\"\nrules = [1]\n";
        let problems = parse_then(text, |_| Err::<(), _>(vec![("filters[1].rules".to_owned(), "bad".to_owned())]))
            .expect_err("the build fails");
        assert_eq!((problems[0].line, problems[0].column), (6, 1), "{problems:#?}");
        let problems = parse_then(text, |_| Err::<(), _>(vec![("filters[1].missing".to_owned(), "x".to_owned())]))
            .expect_err("the build fails");
        assert_eq!(problems[0].line, 4, "falls back to the entry: {problems:#?}");
    }

    #[test]
    fn store_path_and_url_together_are_a_problem() {
        let text = "[store]\npath = \"a.db\"\nurl = \"postgres://u@127.0.0.1/db\"\n";
        let problems = parse(text).expect_err("both set");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!((problems[0].line, problems[0].column), (3, 1));
        assert_eq!(problems[0].key.as_deref(), Some("store.url"));
        assert!(problems[0].message.contains("store.path"), "{}", problems[0]);

        let config = parse("[store]\nurl = \"postgresql://u@127.0.0.1:5433/db\"\n").expect("url alone");
        assert_eq!(config.store.url.as_deref(), Some("postgresql://u@127.0.0.1:5433/db"));
        assert!(parse("[store]\npath = \"a.db\"\n").expect("path alone").store.url.is_none());
        // A Unix socket, and libpq's parameters.
        parse("[store]\nurl = \"postgres://u@/db?host=/run/postgresql&options=-csearch_path%3Dwr\"\n")
            .expect("socket URL");
    }

    #[test]
    fn store_url_is_checked() {
        for (url, says) in [
            ("mysql://u@host/db", "postgres://"),
            ("127.0.0.1:5432", "URL"),
            ("postgres://u@host:notaport/db", "not a valid"),
            ("postgres://u@host/db?sslmode=require", "TLS"),
        ] {
            let problems = parse(&format!("[store]\n\nurl = {url:?}\n")).expect_err(url);
            assert_eq!(problems.len(), 1, "{url}: {problems:#?}");
            assert_eq!((problems[0].line, problems[0].column, problems[0].key.as_deref()), (3, 1, Some("store.url")));
            assert!(problems[0].message.contains(says), "{url}: {}", problems[0]);
        }
    }

    #[test]
    fn a_cluster_needs_a_broker_url_and_a_shared_store() {
        let problems =
            parse("[log]\nlevel = \"info\"\n\n[cluster]\nprefix = \"chat\"\n").expect_err("no broker, no store");
        let summary: Vec<_> = problems.iter().map(|p| (p.line, p.column, p.key.clone().unwrap_or_default())).collect();
        assert_eq!(summary, vec![(4, 2, "cluster".to_owned()), (4, 2, "cluster".to_owned())], "{problems:#?}");
        assert!(problems.iter().any(|p| p.message.contains("needs a broker")), "{problems:#?}");
        assert!(
            problems.iter().any(|p| p.message.contains("a cluster needs a shared store: set [store] url")),
            "{problems:#?}"
        );

        let problems =
            parse("[cluster]\nbroker = \"http://x\"\nprefix = \"a b\"\n[store]\nurl = \"postgres://u@h/db\"\n")
                .expect_err("bad broker and prefix");
        let keys: Vec<_> = problems.iter().map(|p| (p.line, p.key.clone().unwrap_or_default())).collect();
        assert_eq!(keys, vec![(2, "cluster.broker".to_owned()), (3, "cluster.prefix".to_owned())], "{problems:#?}");

        let config = parse("[cluster]\nbroker = \"redis://127.0.0.1:6379\"\n[store]\nurl = \"postgres://u@h/db\"\n")
            .expect("a valid cluster");
        let cluster = config.cluster.expect("[cluster] is set");
        assert_eq!((cluster.broker.as_str(), cluster.prefix.as_str()), ("redis://127.0.0.1:6379", "wardroom"));
        assert!(parse("").expect("no cluster").cluster.is_none());
    }

    #[test]
    fn an_outbound_queue_too_small_for_a_message_and_its_ack_is_refused() {
        let problems = parse("[limits]\noutbound_queue = 1\n").expect_err("one frame cannot hold an echo and an ack");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!((problems[0].line, problems[0].key.as_deref()), (2, Some("limits.outbound_queue")));
        assert!(problems[0].message.contains("must be between 2 and 1000000"), "{}", problems[0]);
        assert!(problems[0].message.contains("its echo and its `ack`"), "{}", problems[0]);
        assert_eq!(parse("[limits]\noutbound_queue = 2\n").expect("the minimum").limits.outbound_queue, 2);
    }

    #[test]
    fn an_outbound_byte_budget_too_small_for_a_message_and_its_ack_is_refused() {
        let text = "[limits]\nmax_message_bytes = 16384\noutbound_queue_bytes = 40000\n";
        let problems = parse(text).expect_err("40000 bytes cannot hold two 16 KiB echoes and their acks");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!((problems[0].line, problems[0].key.as_deref()), (3, Some("limits.outbound_queue_bytes")));
        assert!(problems[0].message.contains("must be between 40960"), "{}", problems[0]);
        assert!(problems[0].message.contains("got 40000"), "{}", problems[0]);
        let problems = parse("[limits]\noutbound_queue_bytes = 2147483648\n").expect_err("over 1 GiB");
        assert_eq!(problems[0].key.as_deref(), Some("limits.outbound_queue_bytes"));
        let limits = parse("[limits]\noutbound_queue_bytes = 40960\n").expect("the minimum").limits;
        assert_eq!(limits.outbound_queue_bytes, 40960);
        assert_eq!(parse("").expect("defaults").limits.outbound_queue_bytes, 4 * 1024 * 1024);
    }

    #[test]
    fn semantic_problems_point_at_the_key() {
        let problems = parse("[timeouts]\nping_interval = \"30s\"\nidle = \"10s\"\n").expect_err("idle < ping");
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].line, problems[0].column), (3, 1));
        assert_eq!(problems[0].key.as_deref(), Some("timeouts.idle"));
    }
}
