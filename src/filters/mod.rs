//! The built-in filters, one per file, and the function that registers them.
//!
//! - [`origin`]: page origins allowed to connect (HTTP 403 otherwise).
//! - [`size`]: message size in bytes and characters (`too_large`).
//! - [`rate`]: rate limits per user, role and address, and on connections
//!   (`rate_limited`, HTTP 429 at the upgrade).
//! - [`profanity`]: word lists and regex rules on normalised text
//!   ([`normalize`]), with reject, mask, flag and hold actions.
//! - [`slow_mode`]: one message per interval per user in a room (`slow_mode`).

pub mod normalize;
pub mod origin;
pub mod profanity;
pub mod rate;
pub mod size;
pub mod slow_mode;

use wardroom_plugin_api::Registry;

/// Registers every built-in filter kind.
pub fn register(registry: &mut Registry) {
    registry.register(origin::OriginFactory);
    registry.register(size::SizeFactory);
    registry.register(rate::RateFactory);
    registry.register(profanity::ProfanityFactory);
    registry.register(slow_mode::SlowModeFactory);
}
