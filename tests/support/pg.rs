//! The real PostgreSQL server for tests: `postgres://postgres@127.0.0.1:5432/test`
//! (trust auth; another with `WARDROOM_TEST_POSTGRES`), one schema per test
//! (through the URL's `options=-csearch_path%3D…`), dropped at its end.
//! An unreachable server fails the test with a message saying so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The database the tests use.
pub fn base_url() -> String {
    std::env::var("WARDROOM_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn base_config() -> postgres::Config {
    base_url().parse().expect("WARDROOM_TEST_POSTGRES is a PostgreSQL URL")
}

/// Runs `sql` (simple protocol) on a connection and a thread of their own
/// (the blocking client may not run on a tokio runtime thread).
pub fn execute(sql: &str) -> Result<(), String> {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let text = |e: postgres::Error| e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned());
        let mut client = base_config().connect(postgres::NoTls).map_err(|e| format!("connect: {}", text(e)))?;
        client.batch_execute(&sql).map_err(text)
    })
    .join()
    .expect("sql thread")
}

/// A schema of its own for one test, dropped at the end.
pub struct Pg {
    /// The schema's name.
    pub schema: String,
}

impl Pg {
    /// Creates a fresh schema; fails the test if PostgreSQL cannot be reached.
    pub fn new() -> Pg {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let schema = format!("wr_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        if let Err(e) = execute(&format!("CREATE SCHEMA {schema}")) {
            panic!(
                "PostgreSQL is not reachable at {} ({e}): these tests need the real server \
                 (.ci/run starts it; set WARDROOM_TEST_POSTGRES for another)",
                base_url()
            );
        }
        Pg { schema }
    }

    /// The schema's URL, for `[store] url`.
    pub fn url(&self) -> String {
        let config = base_config();
        let user = config.get_user().unwrap_or("postgres");
        let db = config.get_dbname().unwrap_or("test");
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "postgres://{user}@{host}:{port}/{db}?options=-csearch_path%3D{schema}&application_name={schema}",
            schema = self.schema
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Err(e) = execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)) {
            eprintln!("cannot drop schema {}: {e}", self.schema);
        }
    }
}
