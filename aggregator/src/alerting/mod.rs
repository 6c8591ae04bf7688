//! Alerting: deciding that something is wrong and telling the right people.
//!
//! - [`rules`]: threshold rules: the file, evaluation and lifecycle (pure), the live rule set.
//! - [`canary`]: automatic comparison of a new version with the one it replaces (pure), its inputs and its alert.
//! - [`alerts`]: the manager (records, escalation, acknowledgements), webhook payloads and delivery.
//! - [`event`]: the alert currency all three trade in; [`escalation`]: owners and their chains. Both are leaves.
//!
//! This room depends only on the leaves (`model`, `health`); it never reaches the pipeline or the publishing side.
//! Alert records leave through the [`alerts::RecordSink`] the composition root hands it.

pub(crate) mod alerts;
pub(crate) mod canary;
pub(crate) mod escalation;
pub(crate) mod event;
pub(crate) mod rules;
