//! What a request names, checked before a node acts on it: id lists (`GET
//! /v1/buckets?ids=`), the held set of a subscribe, pairing codes and structure names.
//!
//! These are the decoders that bound what one request can make a node do. Ids are sets: a
//! list naming one bucket a thousand times is the same request as naming it once, so its
//! cost on the server is that of its distinct ids, and the number of distinct ids is capped
//! by the caller's limit. Pure functions, fuzzed (`proto/fuzz`: `id_list`,
//! `subscribe_request`, `pair_request`).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::api::HeldBucket;
use crate::reconcile::Held;
use crate::{BucketId, ProtoError, SetKey};

/// The distinct bucket ids of a comma-separated list (`ids=a,b,a` names `a` and `b`),
/// sorted. Empty items are skipped; any invalid id fails the whole list; more than `max`
/// distinct ids fail with [`ProtoError::TooManyIds`] as soon as the `max + 1`-th appears, so
/// the work is bounded by `max` whatever the list's length.
pub fn id_list(list: &str, max: usize) -> Result<Vec<BucketId>, ProtoError> {
    // Repeats are recognized by their text, before anything is allocated for them.
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for item in list.split(',').filter(|s| !s.is_empty()) {
        if seen.contains(item) {
            continue;
        }
        if seen.len() == max {
            return Err(ProtoError::TooManyIds { max });
        }
        BucketId::parse(item)?;
        seen.insert(item);
    }
    seen.into_iter().map(BucketId::parse).collect()
}

/// The distinct held buckets of a subscribe, in the order each id first appears. An id
/// listed twice with the same timestamp and version counts once; listed with different
/// ones, the client cannot hold both, so it holds neither: the bucket is sent at once
/// (version `None`). More than `max` distinct ids fail with [`ProtoError::TooManyIds`].
pub fn held_set(buckets: &[HeldBucket], max: usize) -> Result<Vec<Held>, ProtoError> {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out: Vec<Held> = Vec::new();
    for h in buckets {
        match index.get(h.id.as_str()) {
            Some(&i) => {
                let first = &mut out[i];
                if first.version != h.version || first.timestamp != h.timestamp {
                    first.version = None;
                    first.timestamp = None;
                }
            }
            None => {
                if out.len() == max {
                    return Err(ProtoError::TooManyIds { max });
                }
                let id = BucketId::parse(&h.id)?;
                index.insert(h.id.as_str(), out.len());
                out.push(Held {
                    id,
                    timestamp: h.timestamp,
                    version: h.version,
                });
            }
        }
    }
    Ok(out)
}

/// The characters of pairing codes: no 0/O, no 1/I.
pub const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
/// Characters in a pairing code (40 bits: 8 × 5).
pub const CODE_LEN: usize = 8;

/// A pairing code as users type it (`7q4k-92xd`, ` 7Q4K92XD `) in its canonical form
/// `7Q4K-92XD`; anything else is [`ProtoError::InvalidPairingCode`]. Redeeming compares
/// canonical forms, so a typo never reaches the store as a different lookup.
pub fn pairing_code(input: &str) -> Result<String, ProtoError> {
    let trimmed = input.trim();
    if trimmed.len() > 2 * CODE_LEN + 1 {
        return Err(ProtoError::InvalidPairingCode);
    }
    let mut code = String::with_capacity(CODE_LEN + 1);
    let mut chars = 0;
    for (i, c) in trimmed.chars().enumerate() {
        if c == '-' && i == CODE_LEN / 2 && chars == CODE_LEN / 2 {
            continue;
        }
        let up = c.to_ascii_uppercase();
        if !up.is_ascii() || !CODE_ALPHABET.contains(&(up as u8)) {
            return Err(ProtoError::InvalidPairingCode);
        }
        if chars == CODE_LEN / 2 {
            code.push('-');
        }
        code.push(up);
        chars += 1;
    }
    if chars != CODE_LEN {
        return Err(ProtoError::InvalidPairingCode);
    }
    Ok(code)
}

/// Characters of the name kept at the front of a structure's key, for people reading it.
const NAME_PREFIX: usize = 47;
/// URL64 characters of the hash that makes a structure's key its owner's (96 bits).
const SCOPE_HASH: usize = 16;

/// The bucket set key of user `user_id`'s structure `name`: the name (validated like any
/// set key, and shortened) followed by a hash of owner and name. Structure names are per
/// user: two users' "home" are two structures, so naming one never reveals whether another
/// account has one (seed 000 structures; issue 13 finding 7).
pub fn structure_key(user_id: &str, name: &str) -> Result<SetKey, ProtoError> {
    SetKey::parse(name)?;
    let mut h = Sha256::new();
    h.update(b"tether-structure-v1\0");
    h.update((user_id.len() as u64).to_be_bytes());
    h.update(user_id.as_bytes());
    h.update(name.as_bytes());
    let digest = URL_SAFE_NO_PAD.encode(h.finalize());
    let prefix = &name[..name.len().min(NAME_PREFIX)];
    let mut key = String::with_capacity(prefix.len() + 1 + SCOPE_HASH);
    key.push_str(prefix);
    key.push('-');
    key.push_str(&digest[..SCOPE_HASH]);
    SetKey::parse(&key)
}

/// How long ago a load balancer first received a request, from its
/// `X-Request-Start: t=<ms or µs since the epoch>` header (HAProxy
/// `http-request set-header X-Request-Start t=%Ts%ms`; the `t=` is optional), at wall time
/// `now_ms`. `0` for a missing or unreadable value or one in the future; at most
/// `cap_ms` (a clock far off says nothing useful).
pub fn balancer_wait_ms(header: Option<&str>, now_ms: u64, cap_ms: u64) -> u64 {
    let Some(text) = header else { return 0 };
    let digits = text.trim().trim_start_matches("t=");
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let Ok(t) = digits.parse::<u64>() else {
        return 0;
    };
    // Microseconds when it could not be milliseconds (after the year 5000).
    let t_ms = if t >= 100_000_000_000_000 {
        t / 1000
    } else {
        t
    };
    now_ms.saturating_sub(t_ms).min(cap_ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_balancers_request_start_gives_the_time_already_waited() {
        let now = 1_763_884_800_000;
        let table = [
            (Some("t=1763884797000"), 3000),
            (Some("1763884797000"), 3000),
            (Some("t=1763884797500123"), 2500),
            (Some("t=1763884900000"), 0),
            (Some("t=1000"), 10_000),
            (Some("t="), 0),
            (Some("t=12x"), 0),
            (Some("t=99999999999999999999999"), 0),
            (None, 0),
        ];
        for (header, want) in table {
            assert_eq!(balancer_wait_ms(header, now, 10_000), want, "{header:?}");
        }
    }

    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn held(id: &str, version: Option<u64>) -> HeldBucket {
        HeldBucket {
            id: id.into(),
            timestamp: None,
            version,
        }
    }

    #[test]
    fn id_lists_are_sets() {
        let many = vec!["device.A"; 10_000].join(",");
        let ids = id_list(&many, 2).expect("one distinct id");
        assert_eq!(ids.len(), 1);
        let ids = id_list("shared.A,,device.A,shared.A,", 2).expect("two");
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(ids, ["device.A", "shared.A"]);
        assert_eq!(
            id_list("device.A,device.B,device.C", 2),
            Err(ProtoError::TooManyIds { max: 2 })
        );
        assert!(matches!(
            id_list("device.A,nope", 8),
            Err(ProtoError::InvalidBucketId(_))
        ));
        assert_eq!(id_list("", 8), Ok(vec![]));
    }

    #[test]
    fn held_sets_count_each_bucket_once_and_disagreeing_copies_as_none() {
        let list = vec![held("device.A", Some(3)); 1024];
        let set = held_set(&list, 1).expect("one distinct id");
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].version, Some(3));
        let set = held_set(
            &[
                held("shared.A", Some(1)),
                held("device.A", Some(3)),
                held("shared.A", Some(2)),
            ],
            4,
        )
        .expect("two");
        assert_eq!(set[0].id.as_str(), "shared.A");
        assert_eq!(set[0].version, None, "two versions of one bucket: send it");
        assert_eq!(set[1].version, Some(3));
        assert_eq!(
            held_set(&[held("device.A", None), held("device.B", None)], 1),
            Err(ProtoError::TooManyIds { max: 1 })
        );
    }

    #[test]
    fn pairing_codes_have_one_canonical_form() {
        for typed in ["7Q4K-92XD", "7q4k-92xd", " 7Q4K92XD ", "7q4K92Xd"] {
            assert_eq!(pairing_code(typed).as_deref(), Ok("7Q4K-92XD"), "{typed:?}");
        }
        for bad in [
            "",
            "7Q4K-92X",
            "7Q4K-92XD1",
            "7Q4-K92XD",
            "0Q4K-92XD",
            "7Q4K--92XD",
            "7Q4K 92XD",
            "ÄQ4K-92XD",
            "-7Q4K92XD",
        ] {
            assert_eq!(
                pairing_code(bad),
                Err(ProtoError::InvalidPairingCode),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn structure_keys_are_per_user_and_stable() {
        let a = structure_key("alice", "home").expect("valid");
        let b = structure_key("bob", "home").expect("valid");
        assert_ne!(a, b, "two users' structures of one name are two structures");
        assert_eq!(a, structure_key("alice", "home").expect("valid"));
        assert!(a.as_str().starts_with("home-"), "{a}");
        assert_ne!(a, structure_key("alice", "home2").expect("valid"));
        // Owner and name are delimited: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(
            structure_key("ab", "c").expect("valid"),
            structure_key("a", "bc").expect("valid")
        );
        let long = "n".repeat(64);
        assert!(structure_key("alice", &long).is_ok());
        assert!(structure_key("alice", "no.dots").is_err());
        assert!(structure_key("alice", "").is_err());
    }

    proptest! {
        #[test]
        fn id_list_is_the_distinct_valid_ids(keys in prop::collection::vec("[A-C]{1,2}", 0..40)) {
            let list = keys.iter().map(|k| format!("device.{k}")).collect::<Vec<_>>().join(",");
            let want: BTreeSet<String> = keys.iter().map(|k| format!("device.{k}")).collect();
            match id_list(&list, 5) {
                Ok(ids) => {
                    let got: BTreeSet<String> = ids.iter().map(ToString::to_string).collect();
                    prop_assert!(want.len() <= 5);
                    prop_assert_eq!(got, want);
                }
                Err(e) => {
                    prop_assert!(want.len() > 5);
                    prop_assert_eq!(e, ProtoError::TooManyIds { max: 5 });
                }
            }
        }

        #[test]
        fn canonical_codes_are_fixed_points(raw in "[2-9A-HJ-NP-Z]{8}") {
            let canon = pairing_code(&raw).expect("alphabet only");
            prop_assert_eq!(pairing_code(&canon).expect("canonical"), canon.clone());
            prop_assert_eq!(pairing_code(&canon.to_lowercase()).expect("any case"), canon);
        }
    }
}
