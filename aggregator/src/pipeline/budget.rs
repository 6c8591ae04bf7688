//! Memory between the sockets and the shards, bounded in bytes: each agent stream may have at most
//! `max_queued_bytes_per_stream` of snapshots waiting for its shard, and all streams together at most
//! `max_queued_bytes`. A stream over its share waits before reading its next message, so HTTP/2 flow control
//! pushes back on that agent alone; the global bound only binds when many streams are full at once. A reservation
//! is released when the shard is done with the snapshot (it travels with it).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Units of the semaphores: KiB, so that a u32 permit count covers any sane limit.
const UNIT: usize = 1024;

/// The bound shared by every stream.
#[derive(Debug, Clone)]
pub(crate) struct QueueBudget {
    global: Arc<Semaphore>,
    global_units: u32,
    per_stream_units: u32,
}

/// One stream's share of the budget.
#[derive(Debug)]
pub(crate) struct StreamBudget {
    own: Arc<Semaphore>,
    shared: QueueBudget,
}

/// Bytes reserved for one queued snapshot; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Reservation {
    _own: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT))
        .unwrap_or(u32::MAX)
        .max(1)
}

impl QueueBudget {
    /// A budget of `total` bytes, `per_stream` of them at most for one stream.
    pub(crate) fn new(total: usize, per_stream: usize) -> Self {
        let global_units = units(total).min(Semaphore::MAX_PERMITS as u32);
        Self {
            global: Arc::new(Semaphore::new(global_units as usize)),
            global_units,
            per_stream_units: units(per_stream).min(global_units),
        }
    }

    /// A new stream's share.
    pub(crate) fn stream(&self) -> StreamBudget {
        StreamBudget {
            own: Arc::new(Semaphore::new(self.per_stream_units as usize)),
            shared: self.clone(),
        }
    }
}

impl StreamBudget {
    /// Waits until `bytes` fit in this stream's share and in the global budget, then reserves them. A snapshot
    /// larger than a share is charged the whole share (it still passes, alone).
    pub(crate) async fn reserve(&self, bytes: usize) -> Option<Reservation> {
        let n = units(bytes)
            .min(self.shared.per_stream_units)
            .min(self.shared.global_units);
        let own = self.own.clone().acquire_many_owned(n).await.ok()?;
        let global = self
            .shared
            .global
            .clone()
            .acquire_many_owned(n)
            .await
            .ok()?;
        Some(Reservation {
            _own: own,
            _global: global,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn ready<F: Future>(future: F) -> Option<F::Output> {
        let mut future = pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_full_stream_waits_alone_and_resumes_when_its_shard_catches_up() {
        let budget = QueueBudget::new(64 * UNIT, 8 * UNIT);
        let (noisy, quiet) = (budget.stream(), budget.stream());
        let held: Vec<Reservation> = (0..8)
            .map(|_| {
                ready(noisy.reserve(UNIT))
                    .flatten()
                    .expect("within its share")
            })
            .collect();
        assert!(
            ready(noisy.reserve(UNIT)).is_none(),
            "the stream over its share waits"
        );
        assert!(
            ready(quiet.reserve(4 * UNIT)).flatten().is_some(),
            "another stream is not held up"
        );
        drop(held);
        assert!(
            ready(noisy.reserve(UNIT)).flatten().is_some(),
            "released bytes are reusable"
        );
    }

    #[test]
    fn the_global_bound_holds_when_every_stream_is_within_its_share() {
        let budget = QueueBudget::new(10 * UNIT, 8 * UNIT);
        let (a, b) = (budget.stream(), budget.stream());
        let first = ready(a.reserve(6 * UNIT)).flatten().expect("fits");
        assert!(
            ready(b.reserve(6 * UNIT)).is_none(),
            "only 4 KiB left overall"
        );
        let second = ready(b.reserve(4 * UNIT))
            .flatten()
            .expect("fits what is left");
        let oversized = budget.stream();
        drop((first, second));
        assert!(
            ready(oversized.reserve(100 * UNIT)).flatten().is_some(),
            "a snapshot over a share is charged the share and passes"
        );
    }
}
