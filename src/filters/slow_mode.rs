//! `slow_mode`: in the rooms it applies to, each user may send one message
//! per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use wardroom_plugin_api::{BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Verdict};

use crate::lock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowModeOptions {
    /// The interval, e.g. `"10s"`.
    interval: String,
}

/// Last message time per (room, user), kept across reloads.
type LastSent = Mutex<HashMap<(String, String), Instant>>;

/// The built filter.
#[derive(Debug)]
pub struct SlowMode {
    interval: Duration,
    last: Arc<LastSent>,
}

/// Factory for `kind = "slow_mode"`.
#[derive(Debug)]
pub struct SlowModeFactory;

impl FilterFactory for SlowModeFactory {
    fn kind(&self) -> &str {
        "slow_mode"
    }

    fn build(&self, options: &Options, ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        let options: SlowModeOptions = options.parse()?;
        let interval =
            crate::config::parse_duration(&options.interval).map_err(|e| BuildError::option("interval", e))?;
        if interval.is_zero() {
            return Err(BuildError::option("interval", "must be longer than 0s"));
        }
        let last = ctx.state("last_sent", |_: &LastSent| true, LastSent::default);
        Ok(Box::new(SlowMode { interval, last }))
    }
}

impl SlowMode {
    /// Checks (and on success records) a message at `now`.
    fn check(&self, room: &str, user: &str, now: Instant) -> Verdict {
        let mut last = lock(&self.last);
        let key = (room.to_owned(), user.to_owned());
        if let Some(previous) = last.get(&key) {
            let next = *previous + self.interval;
            if now < next {
                let wait = next - now;
                return Verdict::reject_for(
                    "slow_mode",
                    format!(
                        "slow mode: one message every {:?} in this room; wait {} ms",
                        self.interval,
                        wait.as_millis().max(1)
                    ),
                    wait,
                );
            }
        }
        last.insert(key, now);
        Verdict::Allow
    }
}

impl Filter for SlowMode {
    fn on_message(&self, _message: &mut Message, ctx: &Context<'_>) -> Verdict {
        self.check(ctx.room, ctx.user_id, Instant::now())
    }

    fn housekeeping(&self) {
        let now = Instant::now();
        lock(&self.last).retain(|_, sent| now.duration_since(*sent) < self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_per_user_and_room() {
        let filter = SlowMode { interval: Duration::from_secs(10), last: Arc::default() };
        let t0 = Instant::now();
        assert_eq!(filter.check("r", "alice", t0), Verdict::Allow);
        let Verdict::Reject { code, retry_after, .. } = filter.check("r", "alice", t0 + Duration::from_secs(4)) else {
            panic!("second message within the interval")
        };
        assert_eq!((code.as_str(), retry_after), ("slow_mode", Some(Duration::from_secs(6))));
        assert_eq!(filter.check("r", "bob", t0), Verdict::Allow);
        assert_eq!(filter.check("other", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("r", "alice", t0 + Duration::from_secs(10)), Verdict::Allow);
    }
}
