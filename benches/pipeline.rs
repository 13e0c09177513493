//! Per-message cost of the policy pipeline on a 200-byte message:
//! the default pipeline of the shipped `config.toml`, and a profanity
//! filter with 1,000 rules (word rules plus regex rules).
//!
//! ```sh
//! cargo bench -p wardroom-benches --bench pipeline
//! ```

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use wardroom::pipeline::FilterStates;
use wardroom::policy::Policies;
use wardroom_plugin_api::{Context, Message};

/// 200 bytes of ordinary chat, with punctuation and a few look-alike traps.
const MESSAGE: &str = "Hey everyone! Did you see the match last night? The classic assassin movie \
    after it was great too. Anyone up for a cocktail in Scunthorpe on Friday, around 8pm? Bring snacks, \
    and maybe some cards!!!!!";

fn context(user_id: &str) -> Context<'_> {
    Context {
        user_id,
        nick: "bench",
        roles: &["member"],
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        room: "lobby",
        now: SystemTime::now(),
    }
}

/// `count` different 200-byte messages: the benchmark message with its
/// words rotated.
fn variants(count: usize) -> Vec<String> {
    let words: Vec<&str> = MESSAGE.split(' ').collect();
    (0..count)
        .map(|i| {
            let mut rotated = words.clone();
            rotated.rotate_left((i * 7) % words.len());
            let text = rotated.join(" ");
            assert_eq!(text.len(), 200);
            text
        })
        .collect()
}

fn policies(text: &str) -> Policies {
    let builder =
        wardroom::Server::builder().register(wardroom_link_guard::register).register(wardroom_repeat_guard::register);
    Policies::build(text, builder.registry(), &FilterStates::new()).unwrap_or_else(|p| panic!("{p:?}")).0
}

/// A profanity filter with `words` word rules and `regexes` regex rules.
fn profanity_config(words: usize, regexes: usize) -> String {
    let words: Vec<String> = (0..words).map(|i| format!("\"blocked{i:04}word\"")).collect();
    let rules: Vec<String> =
        (0..regexes).map(|i| format!("{{ regex = \"bad{i:03}[a-z]+x\", action = \"hold\" }}")).collect();
    format!("[[filters]]\nkind = \"profanity\"\nwords = [{}]\nrules = [{}]\n", words.join(", "), rules.join(", "))
}

fn bench(c: &mut Criterion) {
    assert_eq!(MESSAGE.len(), 200, "the benchmark message is 200 bytes");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config.toml")).expect("config.toml");
    // The shipped rate limits would refuse most iterations; measure the
    // pipeline without them (rate limiting costs one keyed GCRA check).
    let default = policies(&shipped.replace("kind = \"rate\"", "kind = \"rate\"\nenabled = false"));
    let large = policies(&profanity_config(900, 100));
    let without_links = policies(
        &shipped
            .replace("kind = \"rate\"", "kind = \"rate\"\nenabled = false")
            .replace("kind = \"link_guard\"", "kind = \"link_guard\"\nenabled = false"),
    );
    // A busy room: many senders and different messages, so that the repeat
    // guard compares each message with earlier, different ones and lets it
    // through, as it does most of the time.
    let users: Vec<String> = (0..1_000).map(|i| format!("guest:{i:016x}")).collect();
    let messages = variants(64);
    let mut group = c.benchmark_group("pipeline");
    let mut next = 0;
    group.bench_function("default_config_200_bytes", |b| {
        b.iter(|| {
            next += 1;
            let ctx = context(&users[next % users.len()]);
            let mut message = Message { content: messages[next % messages.len()].clone() };
            let outcome = default.pipeline.on_message(&mut message, &ctx);
            debug_assert!(outcome.verdict.lets_through(), "{outcome:?}");
            black_box(outcome)
        })
    });
    group.bench_function("default_config_without_link_guard", |b| {
        b.iter(|| {
            next += 1;
            let ctx = context(&users[next % users.len()]);
            let mut message = Message { content: messages[next % messages.len()].clone() };
            black_box(without_links.pipeline.on_message(&mut message, &ctx))
        })
    });
    let ctx = context(&users[0]);
    group.bench_function("profanity_1000_rules_200_bytes", |b| {
        b.iter(|| {
            let mut message = Message { content: MESSAGE.to_owned() };
            black_box(large.pipeline.on_message(&mut message, &ctx))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
