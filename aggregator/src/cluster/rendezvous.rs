//! Which member owns a service: rendezvous (highest random weight) hashing. Every member scores every service;
//! the highest score owns it. A member that comes or goes moves only the services it wins or won: nothing else
//! changes hands. Pure; the hash is SHA-256, so every node (and every version of Strobe) agrees.

use sha2::{Digest, Sha256};

/// The score of `member` for `service`.
pub(crate) fn score(member: &str, service: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(member.as_bytes());
    hasher.update([0u8]);
    hasher.update(service.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The index in `members` of the owner of `service` (ties, vanishingly rare, go to the smaller id), or `None` with
/// no members.
pub(crate) fn owner<'a>(
    service: &str,
    members: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    members
        .into_iter()
        .map(|m| (score(m, service), m))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<String> {
        (0..3000).map(|i| format!("service-{i}")).collect()
    }

    #[test]
    fn every_member_owns_about_its_share() {
        let members = ["a", "b", "c"];
        let mut counts = [0usize; 3];
        for s in services() {
            let o = owner(&s, members).unwrap();
            counts[members.iter().position(|m| *m == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_services_and_coming_back_moves_them_back() {
        let all = ["a", "b", "c"];
        let without_b = ["a", "c"];
        for s in services() {
            let before = owner(&s, all).unwrap();
            let after = owner(&s, without_b).unwrap();
            if before != "b" {
                assert_eq!(before, after, "{s} moved though its owner stayed");
            }
            assert_ne!(after, "b");
        }
    }

    /// SHA-256 of "node-1\0checkout", first 8 bytes big-endian (computed outside Rust).
    const PINNED: u64 = 4030863689952039589;

    #[test]
    fn no_members_no_owner_and_the_score_is_stable() {
        assert_eq!(owner("x", Vec::<&str>::new()), None);
        // Fixed forever: nodes of different versions must agree (SHA-256 of "node-1\0checkout", first 8 bytes).
        assert_eq!(score("node-1", "checkout"), PINNED);
        assert_ne!(score("node-1", "checkout"), score("node-2", "checkout"));
    }
}
