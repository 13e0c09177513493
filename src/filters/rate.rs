//! `rate`: rate limits with `governor` (GCRA). Messages are limited per user
//! (with quotas per role) and per address; new connections per address per
//! minute and open connections per address are limited at the upgrade.
//!
//! The limiters live in state kept across reloads, so editing the config
//! never frees a user who is being limited (a limiter is rebuilt only when
//! its own quota changes). Idle keys are pruned by `housekeeping`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{NotUntil, Quota, RateLimiter};
use serde::Deserialize;
use wardroom_plugin_api::{
    BuildContext, BuildError, Connection, Context, Filter, FilterFactory, Message, Options, Verdict,
};

use crate::lock;

/// A rate: `per_second` or `per_minute` events, with bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    #[serde(default)]
    per_second: Option<f64>,
    #[serde(default)]
    per_minute: Option<f64>,
    #[serde(default)]
    burst: Option<u32>,
}

impl Rate {
    fn quota(&self, option: &str) -> Result<Quota, BuildError> {
        let per_second = match (self.per_second, self.per_minute) {
            (Some(n), None) => n,
            (None, Some(n)) => n / 60.0,
            _ => return Err(BuildError::option(option, "give exactly one of `per_second` and `per_minute`")),
        };
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1_000_000.0) {
            return Err(BuildError::option(
                option,
                format!("the rate must be above 0 and at most 1000000/s, got {per_second}/s"),
            ));
        }
        let period = Duration::from_secs_f64(1.0 / per_second);
        let burst = NonZeroU32::new(self.burst.unwrap_or(1))
            .ok_or_else(|| BuildError::option(option, "`burst` must be at least 1"))?;
        Quota::with_period(period)
            .map(|q| q.allow_burst(burst))
            .ok_or_else(|| BuildError::option(option, "the rate is too high"))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateOptions {
    /// Messages per user.
    #[serde(default)]
    per_user: Option<Rate>,
    /// Messages per user, by role (the most generous quota of the user's roles wins).
    #[serde(default)]
    roles: BTreeMap<String, Rate>,
    /// Messages per address (all users behind it together).
    #[serde(default)]
    per_ip: Option<Rate>,
    /// New connections per address per minute.
    #[serde(default)]
    connections_per_minute: Option<u32>,
    /// Open connections per address.
    #[serde(default)]
    concurrent_connections: Option<u32>,
}

type Keyed<K, C> = RateLimiter<K, HashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Limiters for one set of options; rebuilt only when the options change.
struct Limiters<C: Clock> {
    options: RateOptions,
    per_user: Option<Keyed<String, C>>,
    roles: Vec<(String, Quota, Keyed<String, C>)>,
    per_ip: Option<Keyed<IpAddr, C>>,
    connections: Option<Keyed<IpAddr, C>>,
}

/// The built filter.
pub struct RateLimit<C: Clock = MonotonicClock> {
    clock: C,
    limiters: Arc<Limiters<C>>,
    /// Open connections per address; kept whatever the options.
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    concurrent: Option<u32>,
}

/// Factory for `kind = "rate"`.
#[derive(Debug)]
pub struct RateFactory;

impl FilterFactory for RateFactory {
    fn kind(&self) -> &str {
        "rate"
    }

    fn build(&self, options: &Options, ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        Ok(Box::new(RateLimit::build(options.parse()?, MonotonicClock, ctx)?))
    }
}

impl<C: Clock + Clone + Send + Sync + 'static> RateLimit<C>
where
    C::Instant: Send + Sync,
{
    fn build(options: RateOptions, clock: C, ctx: &mut BuildContext) -> Result<Self, BuildError> {
        let keyed = |rate: &Rate, option: &str| -> Result<(Quota, Keyed<String, C>), BuildError> {
            let quota = rate.quota(option)?;
            Ok((quota, RateLimiter::hashmap_with_clock(quota, clock.clone())))
        };
        let per_user = options.per_user.as_ref().map(|r| keyed(r, "per_user")).transpose()?.map(|(_, l)| l);
        let mut roles = Vec::new();
        for (role, rate) in &options.roles {
            let (quota, limiter) = keyed(rate, &format!("roles.{role}"))?;
            roles.push((role.clone(), quota, limiter));
        }
        let per_ip = options
            .per_ip
            .as_ref()
            .map(|r| r.quota("per_ip").map(|q| RateLimiter::hashmap_with_clock(q, clock.clone())))
            .transpose()?;
        let connections = options
            .connections_per_minute
            .map(|n| {
                let n = NonZeroU32::new(n)
                    .ok_or_else(|| BuildError::option("connections_per_minute", "must be at least 1"))?;
                Ok::<_, BuildError>(RateLimiter::hashmap_with_clock(Quota::per_minute(n), clock.clone()))
            })
            .transpose()?;
        if options.concurrent_connections == Some(0) {
            return Err(BuildError::option("concurrent_connections", "must be at least 1"));
        }
        let concurrent = options.concurrent_connections;
        let fresh = Limiters { options: options.clone(), per_user, roles, per_ip, connections };
        let limiters = ctx.state("limiters", |old: &Limiters<C>| old.options == options, || fresh);
        let open = ctx.state("open", |_: &Mutex<HashMap<IpAddr, u32>>| true, Mutex::default);
        Ok(RateLimit { clock, limiters, open, concurrent })
    }

    fn retry_after(&self, not_until: &NotUntil<C::Instant>) -> Duration {
        not_until.wait_time_from(self.clock.now())
    }
}

fn limited(what: &str, wait: Duration) -> Verdict {
    let ms = wait.as_millis().max(1);
    Verdict::reject_for("rate_limited", format!("{what}; try again in {ms} ms"), wait.max(Duration::from_millis(1)))
}

impl<C: Clock + Clone + Send + Sync + 'static> Filter for RateLimit<C>
where
    C::Instant: Send + Sync,
{
    fn on_connect(&self, connection: &Connection<'_>) -> Verdict {
        if let Some(limiter) = &self.limiters.connections
            && let Err(not_until) = limiter.check_key(&connection.addr)
        {
            return limited("too many new connections from your address", self.retry_after(&not_until));
        }
        if let Some(max) = self.concurrent {
            let mut open = lock(&self.open);
            let count = open.entry(connection.addr).or_insert(0);
            if *count >= max {
                return Verdict::reject("rate_limited", format!("at most {max} connections per address"));
            }
            *count += 1;
        }
        Verdict::Allow
    }

    fn on_disconnect(&self, connection: &Connection<'_>) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&connection.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&connection.addr);
            }
        }
    }

    fn on_message(&self, _message: &mut Message, ctx: &Context<'_>) -> Verdict {
        let limiters = &self.limiters;
        // The most generous quota among the user's roles, else the default.
        let role_limiter = limiters
            .roles
            .iter()
            .filter(|(role, _, _)| ctx.has_role(role))
            .max_by_key(|(_, quota, _)| (quota.burst_size(), std::cmp::Reverse(quota.replenish_interval())))
            .map(|(_, _, limiter)| limiter);
        if let Some(limiter) = role_limiter.or(limiters.per_user.as_ref())
            && let Err(not_until) = limiter.check_key(&ctx.user_id.to_owned())
        {
            return limited("you are sending messages too fast", self.retry_after(&not_until));
        }
        if let Some(limiter) = &limiters.per_ip
            && let Err(not_until) = limiter.check_key(&ctx.addr)
        {
            return limited("too many messages from your address", self.retry_after(&not_until));
        }
        Verdict::Allow
    }

    fn housekeeping(&self) {
        let limiters = &self.limiters;
        for (_, _, limiter) in &limiters.roles {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(l) = &limiters.per_user {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&limiters.per_ip, &limiters.connections].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::SystemTime;

    fn options(toml: &str) -> RateOptions {
        serde_json::from_value(serde_json::to_value(toml.parse::<toml::Table>().unwrap()).unwrap()).unwrap()
    }

    fn ctx<'a>(user: &'a str, roles: &'a [&'a str]) -> Context<'a> {
        Context {
            user_id: user,
            nick: user,
            roles,
            addr: "10.0.0.1".parse().unwrap(),
            room: "r",
            now: SystemTime::now(),
        }
    }

    fn send(filter: &RateLimit<FakeRelativeClock>, ctx: &Context<'_>) -> Verdict {
        filter.on_message(&mut Message { content: "hi".into() }, ctx)
    }

    #[test]
    fn users_are_limited_with_a_retry_hint_and_recover_over_time() {
        let clock = FakeRelativeClock::default();
        let mut build = BuildContext::default();
        let filter =
            RateLimit::build(options("per_user = { per_second = 1, burst = 2 }"), clock.clone(), &mut build).unwrap();
        let alice = ctx("alice", &[]);
        assert_eq!(send(&filter, &alice), Verdict::Allow);
        assert_eq!(send(&filter, &alice), Verdict::Allow);
        let Verdict::Reject { code, retry_after: Some(wait), .. } = send(&filter, &alice) else { panic!("limited") };
        assert_eq!(code, "rate_limited");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(send(&filter, &ctx("bob", &[])), Verdict::Allow, "bob has his own bucket");
        clock.advance(Duration::from_secs(1));
        assert_eq!(send(&filter, &alice), Verdict::Allow);
    }

    #[test]
    fn roles_get_their_own_quota() {
        let clock = FakeRelativeClock::default();
        let filter = RateLimit::build(
            options("per_user = { per_minute = 1 }\nroles.moderator = { per_minute = 60, burst = 5 }"),
            clock,
            &mut BuildContext::default(),
        )
        .unwrap();
        let moderator = ctx("mod", &["member", "moderator"]);
        for _ in 0..5 {
            assert_eq!(send(&filter, &moderator), Verdict::Allow);
        }
        let member = ctx("m", &["member"]);
        assert_eq!(send(&filter, &member), Verdict::Allow);
        assert_eq!(send(&filter, &member).name(), "reject");
    }

    #[test]
    fn limits_survive_a_rebuild_with_the_same_quota() {
        let clock = FakeRelativeClock::default();
        let mut first = BuildContext::default();
        let opts = options("per_user = { per_minute = 1 }");
        let filter = RateLimit::build(opts.clone(), clock.clone(), &mut first).unwrap();
        let alice = ctx("alice", &[]);
        assert_eq!(send(&filter, &alice), Verdict::Allow);
        let mut second = BuildContext::new(first.into_kept());
        let rebuilt = RateLimit::build(opts, clock, &mut second).unwrap();
        assert_eq!(send(&rebuilt, &alice).name(), "reject", "a reload must not reset the bucket");
    }

    #[test]
    fn connections_are_limited_per_address() {
        let clock = FakeRelativeClock::default();
        let filter = RateLimit::build(
            options("connections_per_minute = 3\nconcurrent_connections = 2"),
            clock.clone(),
            &mut BuildContext::default(),
        )
        .unwrap();
        let conn = Connection { addr: "10.0.0.9".parse().unwrap(), origin: None, user_id: None };
        assert_eq!(filter.on_connect(&conn), Verdict::Allow);
        assert_eq!(filter.on_connect(&conn), Verdict::Allow);
        assert_eq!(filter.on_connect(&conn).name(), "reject", "two are open");
        filter.on_disconnect(&conn);
        assert_eq!(filter.on_connect(&conn).name(), "reject", "the fourth new connection within a minute");
        clock.advance(Duration::from_secs(60));
        assert_eq!(filter.on_connect(&conn), Verdict::Allow);
    }

    #[test]
    fn bad_quotas_are_refused_with_the_option_named() {
        let build = |toml: &str| {
            RateLimit::build(options(toml), FakeRelativeClock::default(), &mut BuildContext::default()).err().unwrap()
        };
        assert_eq!(build("per_user = { burst = 3 }").option.as_deref(), Some("per_user"));
        assert_eq!(build("per_ip = { per_second = 0 }").option.as_deref(), Some("per_ip"));
        assert_eq!(build("roles.mod = { per_minute = 5, burst = 0 }").option.as_deref(), Some("roles.mod"));
    }
}
