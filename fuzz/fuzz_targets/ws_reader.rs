//! `wardroom::ws::MessageReader::feed` on arbitrary byte streams.
//!
//! Input: 4 header bytes (frame limit, message limit, a seed), then the byte
//! stream a client would send. The stream is fed twice: whole, and cut into
//! reads of pseudo-random sizes with pseudo-random pauses (`Flow::Pause`
//! followed by `resume`, as the connection does when its outbox backs up).
//! Checks: no panic; both runs see the same events and end with the same
//! violation (how bytes are split across reads must not matter); pings are
//! at most 125 bytes; a violation is 1002, 1007 or 1009.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wardroom::ws::{Event, Flow, MessageReader};

/// What one run saw: the events (as text) and the violation code it ended with.
type Run = (Vec<String>, Option<u16>);

struct Recorder {
    events: Vec<String>,
    /// xorshift state; 0 means never pause.
    rng: u32,
}

impl Recorder {
    fn next(&mut self) -> u32 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        x
    }

    fn on(&mut self, event: Event<'_>) -> Flow {
        let flow = match &event {
            Event::Ping(payload) => {
                assert!(payload.len() <= 125, "ping of {} bytes", payload.len());
                Flow::Continue
            }
            // The connection stops reading at a Close frame.
            Event::Close(_) => Flow::Stop,
            _ => Flow::Continue,
        };
        self.events.push(format!("{event:?}"));
        if flow == Flow::Continue && self.rng != 0 && self.next() % 4 == 0 { Flow::Pause } else { flow }
    }
}

fn run(stream: &[u8], max_frame: usize, max_message: usize, seed: u32) -> Run {
    let mut reader = MessageReader::new(max_frame, max_message);
    let mut recorder = Recorder { events: Vec::new(), rng: seed };
    let mut sizes = Recorder { events: Vec::new(), rng: seed | 1 };
    let mut pos = 0;
    while pos < stream.len() {
        let n = if seed == 0 { stream.len() } else { 1 + (sizes.next() % 64) as usize };
        let end = (pos + n).min(stream.len());
        let mut buf = stream[pos..end].to_vec();
        pos = end;
        let mut result = reader.feed(&mut buf, |event| recorder.on(event));
        while result == Ok(Flow::Pause) {
            result = reader.resume(|event| recorder.on(event));
        }
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => return (recorder.events, None),
            Ok(Flow::Pause) => unreachable!(),
            Err(violation) => {
                assert!(matches!(violation.code, 1002 | 1007 | 1009), "{violation:?}");
                return (recorder.events, Some(violation.code));
            }
        }
    }
    (recorder.events, None)
}

fuzz_target!(|data: &[u8]| {
    let [a, b, c, seed, stream @ ..] = data else { return };
    let max_frame = 1 + usize::from(u16::from_le_bytes([*a, *b]));
    let max_message = max_frame + usize::from(*c) * 256;
    let whole = run(stream, max_frame, max_message, 0);
    let split = run(stream, max_frame, max_message, u32::from(*seed).wrapping_mul(0x0101_0101) | 1);
    assert_eq!(whole, split, "splitting the input into reads changed what was seen");
});
