//! The config loader on arbitrary text: the reload path's
//! `Policies::build` (parse, validate, build every filter: word lists,
//! regexes, `[auth]`), as run on every save of `config.toml`.
//!
//! Checks: it returns policies or a list of problems, never panics; each
//! problem is placed at a line and column inside the text; and the whole
//! load takes under a second.
//!
//! One thing is left out: a config that names a `jwt_public_key` file is
//! only parsed, not built, because building it reads that file (a fuzzed
//! path such as `/dev/zero` would make the target hang on I/O, not on
//! parsing).

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wardroom::config::Problem;
use wardroom::pipeline::FilterStates;
use wardroom::policy::Policies;
use wardroom::server::ServerBuilder;
use wardroom_plugin_api::Registry;

/// The built-in filter kinds, as the server registers them.
fn registry() -> &'static Registry {
    static BUILDER: OnceLock<ServerBuilder> = OnceLock::new();
    BUILDER.get_or_init(wardroom::Server::builder).registry()
}

fn check_problems(text: &str, problems: &[Problem]) {
    assert!(!problems.is_empty(), "an error needs at least one problem");
    let lines = text.split('\n').count();
    for problem in problems {
        assert!(problem.line >= 1 && problem.line <= lines, "{problem:?} is outside the text");
        assert!(problem.column >= 1, "{problem:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let start = Instant::now();
    match wardroom::config::parse(text) {
        Err(problems) => check_problems(text, &problems),
        Ok(config) if config.auth.jwt_public_key.is_some() => {}
        Ok(_) => {
            if let Err(problems) = Policies::build(text, registry(), &FilterStates::new()) {
                check_problems(text, &problems);
            }
        }
    }
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "loading took {elapsed:?} on {} bytes", text.len());
});
