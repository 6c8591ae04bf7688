//! Alerts after a rule (or the canary) decides: records and escalation ([`manager`]), what people see
//! ([`record`]), webhook bodies and signatures ([`payload`]), and delivery with retries ([`delivery`]).

pub mod delivery;
pub mod manager;
pub mod payload;
pub mod record;

pub use delivery::{Deliverer, DeliverySettings, Notification};
pub use manager::{AckError, Alerts};
pub use record::{AlertRecord, AlertState, NotifyTransition};
