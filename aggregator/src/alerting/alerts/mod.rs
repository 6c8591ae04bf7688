//! Alerts after a rule (or the canary) decides: records and escalation ([`manager`]), webhook bodies and
//! signatures ([`payload`], pure), and delivery with retries ([`delivery`]).

pub(crate) mod delivery;
pub(crate) mod manager;
pub(crate) mod payload;
pub(crate) mod state;

pub(crate) use delivery::{Deliverer, DeliverySettings, Notification};
pub(crate) use manager::{AckError, Alerts, Handover, Persistence, RecordSink};
pub(crate) use state::SavedAlert;
pub use state::StateError;
