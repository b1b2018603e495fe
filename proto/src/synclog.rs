//! The sync log (seed 001's action tables, seed 004's difference exchange), as pure rules:
//! what one accepted write records ([`Change`]), how a run of changes coalesces into the
//! fields a client must apply to catch up ([`coalesce`], [`diff_since`], [`apply_diff`]),
//! how a server recognises a write it already applied ([`OpRecord`], [`check_op`]), and
//! how an answer is cut to a client's buffer ([`pack`]).
//!
//! Tether's model is field-level: a write sets fields, never removes one. So seed 001's
//! merge table (rows: the older pending action, columns: the newer) collapses for a field
//! to "the later value wins": ADD then UPDATE is an ADD of the updated value, UPDATE then
//! UPDATE is the later UPDATE, and NO CHANGE leaves the other side as it is. DELETE does
//! not exist (a `null` is a value like any other). Applying the coalesced fields of every
//! change after version `v` to a copy of the bucket at `v` gives the bucket as stored.

use alloc::string::String;
#[cfg(feature = "openapi")]
use alloc::vec;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{BucketDoc, BucketList, UpdateOutcome, UpdateRequest};
use crate::{Fields, Hlc, Update};

/// Longest `op_id` (API.md "Idempotent writes").
pub const MAX_OP_ID: usize = 64;

/// Whether `op_id` is 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_op_id(op_id: &str) -> bool {
    !op_id.is_empty()
        && op_id.len() <= MAX_OP_ID
        && op_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What produced a change (the history's `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ChangeKind {
    /// The bucket was created (registration, a new structure): version 1.
    Created,
    /// A write based on the current version.
    Applied,
    /// A write based on an older version, merged field by field.
    Merged,
    /// A write the server made on its own.
    Server,
}

/// One accepted write of a bucket: the entry the sync log keeps for it, committed
/// atomically with the bucket state it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The bucket version this write produced.
    pub version: u64,
    /// The bucket timestamp it produced (ms since the epoch).
    pub timestamp: u64,
    /// How it came about.
    pub outcome: ChangeKind,
    /// Who wrote it: `device:<serial>`, `user:<id>` or `server`.
    pub by: String,
    /// The writer's session, if it named one.
    #[serde(default)]
    pub session: Option<String>,
    /// The write's `op_id`, if it carried one.
    #[serde(default)]
    pub op_id: Option<String>,
    /// The fields this write set (for a creation, the initial value).
    pub fields: Fields,
}

/// The fields a run of changes set, the latest value of each (seed 001's merge table for
/// field-level writes). `changes` must be in version order.
pub fn coalesce<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Fields {
    let mut out = Fields::new();
    for c in changes {
        merge_into(&mut out, &c.fields);
    }
    out
}

/// Merges `newer` into `older` under the merge table: every field `newer` sets wins.
pub fn merge_into(older: &mut Fields, newer: &Fields) {
    for (k, v) in newer {
        older.insert(k.clone(), v.clone());
    }
}

/// The diff that takes a copy held at version `held` to version `current`: the coalesced
/// fields of changes `held + 1 ..= current`. `None` when `changes` (ascending, any range)
/// does not contain every one of those versions (the log no longer reaches back to
/// `held`), or when there is nothing to diff (`held >= current`): send the whole value.
pub fn diff_since(held: u64, current: u64, changes: &[Change]) -> Option<Fields> {
    if held >= current {
        return None;
    }
    let start = changes.iter().position(|c| c.version == held + 1)?;
    let run = changes.get(start..)?;
    let expected = usize::try_from(current - held).ok()?;
    let run = run.get(..expected)?;
    let contiguous = run
        .iter()
        .zip(held + 1..)
        .all(|(c, want)| c.version == want);
    contiguous.then(|| coalesce(run))
}

/// Applies a diff to a held copy: every field it carries replaces the held one.
pub fn apply_diff(held: &mut Fields, changes: &Fields) {
    merge_into(held, changes);
}

/// What the set remembers about a write that carried an `op_id`, committed with the write
/// itself: enough to answer a retry with the original result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// The client's op id.
    pub op_id: String,
    /// The bucket written.
    pub bucket: String,
    /// Who wrote it (`device:<serial>`, `user:<id>`).
    pub by: String,
    /// SHA-256 of the request ([`op_digest`]), hex.
    pub digest: String,
    /// The original outcome.
    pub outcome: UpdateOutcome,
    /// The version the original answer carried (for a refusal: the stored bucket's).
    pub version: u64,
    /// Its timestamp.
    pub timestamp: Hlc,
    /// When the server handled it (ms since the epoch): drives the age retention.
    pub at_ms: u64,
}

/// SHA-256 (hex) of everything that makes a PUT this write: the bucket, the fields (JSON
/// objects serialize with sorted keys, so equal bodies digest equally), the base version,
/// the OCC flag and the session. The `op_id` itself is the key, not part of the digest.
pub fn request_digest(bucket: &str, req: &UpdateRequest) -> String {
    let update = Update {
        value: req.value.clone(),
        base_version: req.base_version,
        occ: req.occ,
    };
    op_digest(bucket, &update, req.session.as_deref())
}

/// [`request_digest`] of a write as the server holds it: its update and session.
pub fn op_digest(bucket: &str, req: &Update, session: Option<&str>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(bucket.as_bytes());
    field(&serde_json::to_vec(&req.value).unwrap_or_default());
    field(&req.base_version.to_be_bytes());
    field(&[u8::from(req.occ)]);
    match session {
        Some(s) => field(s.as_bytes()),
        None => field(&[]),
    }
    let digest = h.finalize();
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    hex
}

/// What to do with a PUT carrying an op id, given what the set remembers of that op id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpCheck<'a> {
    /// Never seen: reconcile it as a new write (and remember it).
    New,
    /// The same principal sent the same write: answer the original result, change nothing.
    Replay(&'a OpRecord),
    /// The op id was used for another write (another body, bucket or principal): 422.
    Reused,
}

/// Seed 001 for a lost acknowledgement: a remembered op id from the same principal with
/// the same request digest is a retry; anything else under that op id is a reuse.
pub fn check_op<'a>(remembered: Option<&'a OpRecord>, by: &str, digest: &str) -> OpCheck<'a> {
    match remembered {
        None => OpCheck::New,
        Some(r) if r.by == by && r.digest == digest => OpCheck::Replay(r),
        Some(_) => OpCheck::Reused,
    }
}

/// The wire format an answer's size is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`.
    Json,
    /// `application/x-protobuf`.
    Protobuf,
}

/// Bytes of a protobuf length-delimited field of `len` bytes with a one-byte tag.
fn pb_field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Bytes `doc` adds to a bucket list (its element, with a separator in JSON).
fn doc_len(doc: &BucketDoc, encoding: Encoding) -> usize {
    match encoding {
        Encoding::Json => serde_json::to_vec(doc).map_or(usize::MAX / 4, |v| v.len()),
        Encoding::Protobuf => {
            use crate::api::WireMessage;
            use prost::Message;
            pb_field_len(doc.to_pb().encoded_len())
        }
    }
}

/// Bytes a pending id adds.
fn pending_len(id: &str, encoding: Encoding) -> usize {
    match encoding {
        // The quoted string; ids are validated bucket ids, so nothing is escaped.
        Encoding::Json => id.len() + 2,
        Encoding::Protobuf => pb_field_len(id.len()),
    }
}

/// Sizes of the parts of a bucket list: the docs' and the pending ids' sums and counts.
#[derive(Debug, Clone, Copy, Default)]
struct Parts {
    docs: usize,
    n_docs: usize,
    pending: usize,
    n_pending: usize,
}

impl Parts {
    /// Exact size of `{"buckets": [docs], "pending": [ids]}` in `encoding`.
    fn len(self, encoding: Encoding) -> usize {
        match encoding {
            Encoding::Protobuf => self.docs + self.pending,
            Encoding::Json => {
                // {"buckets":[d1,d2]} and, when any, ,"pending":["a","b"]
                let mut n = r#"{"buckets":[]}"#.len() + self.docs + self.n_docs.saturating_sub(1);
                if self.n_pending > 0 {
                    n += r#","pending":[]"#.len() + self.pending + self.n_pending - 1;
                }
                n
            }
        }
    }
}

/// Cuts a subscribe answer to `max_bytes` (API.md "Diffs in subscribe answers"): the
/// buckets that fit, in order (one that does not fit is skipped, a later smaller one may
/// still go), and the ids of the rest in `pending`, so that the encoded answer is at most
/// `max_bytes`. When not even one bucket fits, the first goes alone (with every other
/// one pending): the client always makes progress. Linear in the number of buckets.
pub fn pack(docs: Vec<BucketDoc>, max_bytes: Option<u64>, encoding: Encoding) -> BucketList {
    let Some(max) = max_bytes else {
        return BucketList {
            buckets: docs,
            pending: Vec::new(),
        };
    };
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    // Start with every bucket pending and move each into the answer while it still fits.
    let mut parts = Parts::default();
    let sizes: Vec<(usize, usize)> = docs
        .iter()
        .map(|d| {
            let id = pending_len(&d.id, encoding);
            parts.pending += id;
            parts.n_pending += 1;
            (doc_len(d, encoding), id)
        })
        .collect();
    let mut sent = alloc::vec![false; docs.len()];
    for (i, &(doc, id)) in sizes.iter().enumerate() {
        let tried = Parts {
            docs: parts.docs.saturating_add(doc),
            n_docs: parts.n_docs + 1,
            pending: parts.pending - id,
            n_pending: parts.n_pending - 1,
        };
        if tried.len(encoding) <= max {
            sent[i] = true;
            parts = tried;
        }
    }
    if parts.n_docs == 0 {
        if let Some(first) = sent.first_mut() {
            *first = true;
        }
    }
    let mut buckets = Vec::new();
    let mut pending = Vec::new();
    for (doc, went) in docs.into_iter().zip(sent) {
        if went {
            buckets.push(doc);
        } else {
            pending.push(doc.id);
        }
    }
    BucketList { buckets, pending }
}

#[cfg(test)]
mod tests {
    //! Seed 001's merge table and worked example, with Tether's field-level model; the
    //! diff law as a property over any sequence of applied and merged writes; op-id
    //! replay against a model server.
    use super::*;
    use crate::api::WireMessage;
    use crate::{reconcile, Bucket, BucketId, HlcClock, Outcome};
    use alloc::collections::BTreeMap;
    use alloc::format;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;
    use serde_json::json;

    fn fields(v: serde_json::Value) -> Fields {
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("fixture must be an object"),
        }
    }

    fn change(version: u64, kind: ChangeKind, f: serde_json::Value) -> Change {
        Change {
            version,
            timestamp: 1000 + version,
            outcome: kind,
            by: "device:D1".into(),
            session: None,
            op_id: None,
            fields: fields(f),
        }
    }

    /// Seed 001 [0052]: the effective action for a field, given the older (row) and the
    /// newer (column) action. For field-level writes ADD and UPDATE both set the field,
    /// so the table's rows and columns without DELETE reduce to "the later value wins";
    /// NO CHANGE keeps the other side.
    #[test]
    fn merge_table_rows_without_delete_keep_the_later_value() {
        // (older action on field a, newer action on field a) → effective value of a.
        let cases: [(Option<i64>, Option<i64>, Option<i64>); 4] = [
            (None, None, None),          // NO CHANGE, NO CHANGE → NO CHANGE
            (None, Some(2), Some(2)),    // NO CHANGE, ADD/UPDATE → that action
            (Some(1), None, Some(1)),    // ADD/UPDATE, NO CHANGE → the older action
            (Some(1), Some(2), Some(2)), // ADD, UPDATE → ADD with the updated value
        ];
        for (older, newer, want) in cases {
            let mut a = Fields::new();
            if let Some(v) = older {
                a.insert("a".into(), json!(v));
            }
            let mut b = Fields::new();
            if let Some(v) = newer {
                b.insert("a".into(), json!(v));
            }
            merge_into(&mut a, &b);
            assert_eq!(a.get("a").and_then(serde_json::Value::as_i64), want);
        }
    }

    /// Seed 001 FIG 4–6 in Tether's terms: a device offline while two others changed a
    /// contact's fields catches up with one effective set of fields.
    #[test]
    fn seed001_offline_device_catches_up_with_the_effective_fields() {
        // Version 1: the contact as every device holds it.
        let held = fields(json!({"name": "Mitsuko Uchida", "phone": "555-0100"}));
        // The phone's update (v2), then the notebook adds an e-mail (v3) and corrects
        // the phone again (v4).
        let log = [
            change(2, ChangeKind::Applied, json!({"phone": "555-0199"})),
            change(3, ChangeKind::Merged, json!({"email": "mu@example.com"})),
            change(4, ChangeKind::Applied, json!({"phone": "555-0123"})),
        ];
        let diff = diff_since(1, 4, &log).expect("the log reaches back to v1");
        assert_eq!(
            diff,
            fields(json!({"phone": "555-0123", "email": "mu@example.com"}))
        );
        let mut copy = held.clone();
        apply_diff(&mut copy, &diff);
        assert_eq!(
            copy,
            fields(
                json!({"name": "Mitsuko Uchida", "phone": "555-0123", "email": "mu@example.com"})
            )
        );
        // A device already at v3 needs only the phone.
        assert_eq!(
            diff_since(3, 4, &log),
            Some(fields(json!({"phone": "555-0123"})))
        );
    }

    #[test]
    fn no_diff_when_the_log_does_not_reach_the_held_version_or_has_a_gap() {
        let log = [
            change(5, ChangeKind::Applied, json!({"a": 1})),
            change(6, ChangeKind::Applied, json!({"b": 1})),
            change(8, ChangeKind::Applied, json!({"c": 1})),
        ];
        assert_eq!(diff_since(3, 6, &log), None, "v4 was dropped");
        assert_eq!(diff_since(4, 8, &log), None, "v7 is missing");
        assert_eq!(
            diff_since(4, 6, &log),
            Some(fields(json!({"a": 1, "b": 1})))
        );
        assert_eq!(diff_since(6, 6, &log), None, "nothing to diff");
        assert_eq!(diff_since(7, 6, &log), None, "a version from the future");
        assert_eq!(
            diff_since(4, 9, &log),
            None,
            "the log ends before the current version"
        );
    }

    #[test]
    fn coalescing_is_order_correct() {
        let a = change(2, ChangeKind::Applied, json!({"t": 20, "mode": "heat"}));
        let b = change(3, ChangeKind::Applied, json!({"t": 21}));
        assert_eq!(coalesce([&a, &b]), fields(json!({"t": 21, "mode": "heat"})));
        assert_eq!(
            coalesce([&b, &a]),
            fields(json!({"t": 20, "mode": "heat"})),
            "reversed, the older value would win: order matters"
        );
    }

    #[test]
    fn op_ids_are_validated() {
        for ok in ["a", "op-1_X", &"x".repeat(64)] {
            assert!(valid_op_id(ok), "{ok}");
        }
        for bad in ["", "a.b", "a b", "é", &"x".repeat(65), "a/b"] {
            assert!(!valid_op_id(bad), "{bad}");
        }
    }

    fn req(value: serde_json::Value, base_version: u64) -> UpdateRequest {
        UpdateRequest {
            value: fields(value),
            base_version,
            occ: false,
            session: Some("s1".into()),
            op_id: Some("op1".into()),
        }
    }

    #[test]
    fn the_digest_covers_every_part_of_the_write_but_the_op_id() {
        let base = req(json!({"a": 1, "b": [1, {"y": 2, "x": 1}]}), 3);
        let d = request_digest("device.D1", &base);
        assert_eq!(d.len(), 64);
        // Key order in the body does not matter (objects serialize sorted).
        let reordered: UpdateRequest = serde_json::from_str(
            r#"{"value": {"b": [1, {"x": 1, "y": 2}], "a": 1}, "base_version": 3,
                "session": "s1", "op_id": "other"}"#,
        )
        .expect("valid");
        assert_eq!(request_digest("device.D1", &reordered), d);
        let variants = [
            request_digest("shared.D1", &base),
            request_digest(
                "device.D1",
                &req(json!({"a": 2, "b": [1, {"y": 2, "x": 1}]}), 3),
            ),
            request_digest(
                "device.D1",
                &UpdateRequest {
                    base_version: 4,
                    ..base.clone()
                },
            ),
            request_digest(
                "device.D1",
                &UpdateRequest {
                    occ: true,
                    ..base.clone()
                },
            ),
            request_digest(
                "device.D1",
                &UpdateRequest {
                    session: None,
                    ..base.clone()
                },
            ),
        ];
        for v in variants {
            assert_ne!(v, d);
        }
    }

    #[test]
    fn a_remembered_op_id_replays_only_for_the_same_principal_and_body() {
        let rec = OpRecord {
            op_id: "op1".into(),
            bucket: "device.D1".into(),
            by: "device:D1".into(),
            digest: "abc".into(),
            outcome: UpdateOutcome::Merged,
            version: 7,
            timestamp: Hlc::at(5),
            at_ms: 5,
        };
        assert_eq!(check_op(None, "device:D1", "abc"), OpCheck::New);
        assert_eq!(
            check_op(Some(&rec), "device:D1", "abc"),
            OpCheck::Replay(&rec)
        );
        assert_eq!(check_op(Some(&rec), "device:D1", "abd"), OpCheck::Reused);
        assert_eq!(check_op(Some(&rec), "user:alice", "abc"), OpCheck::Reused);
    }

    fn doc(id: &str, n: usize) -> BucketDoc {
        let mut value = Fields::new();
        value.insert("v".into(), json!("x".repeat(n)));
        BucketDoc {
            id: id.into(),
            timestamp: Some(1_763_884_800_123),
            version: Some(42),
            value: Some(value),
            base_version: None,
            changes: None,
        }
    }

    fn encoded(list: &BucketList, e: Encoding) -> usize {
        match e {
            Encoding::Json => serde_json::to_vec(list).expect("json").len(),
            Encoding::Protobuf => list.encode_pb().len(),
        }
    }

    #[test]
    fn pack_names_what_does_not_fit_and_always_sends_one() {
        for e in [Encoding::Json, Encoding::Protobuf] {
            let docs = vec![
                doc("device.a", 300),
                doc("shared.a", 10),
                doc("other.a", 300),
            ];
            let all = pack(docs.clone(), None, e);
            assert!(all.pending.is_empty() && all.buckets.len() == 3);
            // The exact size of "the first two, the third pending" is enough for that …
            let two = BucketList {
                buckets: docs[..2].to_vec(),
                pending: vec!["other.a".into()],
            };
            let exact = encoded(&two, e) as u64;
            let cut = pack(docs.clone(), Some(exact), e);
            assert_eq!(cut, two, "{e:?}");
            assert_eq!(encoded(&cut, e) as u64, exact);
            // … and one byte less is not: the second waits.
            let cut = pack(docs.clone(), Some(exact - 1), e);
            assert_eq!(
                cut.buckets
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>(),
                ["device.a"],
                "{e:?}"
            );
            assert_eq!(cut.pending, ["shared.a", "other.a"]);
            // A big bucket that does not fit is skipped for a later small one.
            let small_first = doc("shared.a", 10);
            let only_small = BucketList {
                buckets: vec![small_first.clone()],
                pending: vec!["device.a".into()],
            };
            let room = encoded(&only_small, e) as u64;
            let cut = pack(vec![doc("device.a", 300), small_first], Some(room), e);
            assert_eq!(cut, only_small, "{e:?}");
            assert!((encoded(&cut, e) as u64) < exact);
            // Too small for anything: the first goes alone, the rest are pending.
            let alone = pack(docs, Some(20), e);
            assert_eq!(alone.buckets.len(), 1);
            assert_eq!(alone.buckets[0].id, "device.a");
            assert_eq!(alone.pending, ["shared.a", "other.a"]);
        }
    }

    proptest! {
        #[test]
        fn pack_stays_within_max_bytes_and_loses_no_bucket(
            sizes in proptest::collection::vec(0usize..400, 0..12),
            max in 0u64..2000,
            pb in any::<bool>())
        {
            let e = if pb { Encoding::Protobuf } else { Encoding::Json };
            let docs: Vec<BucketDoc> =
                sizes.iter().enumerate().map(|(i, n)| doc(&format!("b{i}.k"), *n)).collect();
            let out = pack(docs.clone(), Some(max), e);
            let mut ids: Vec<String> = out.buckets.iter().map(|d| d.id.clone()).collect();
            ids.extend(out.pending.iter().cloned());
            ids.sort();
            let mut want: Vec<String> = docs.iter().map(|d| d.id.clone()).collect();
            want.sort();
            prop_assert_eq!(ids, want, "every stale bucket is sent or pending");
            if out.buckets.len() > 1 || (out.buckets.len() == 1 && encoded(&out, e) as u64 <= max) {
                prop_assert!(encoded(&out, e) as u64 <= max, "{} > {}", encoded(&out, e), max);
            }
            prop_assert!(docs.is_empty() || !out.buckets.is_empty(), "progress");
        }
    }

    fn arb_write() -> impl Strategy<Value = (Fields, bool, bool)> {
        // Fields to set, whether the writer is up to date (else it is based on an older
        // version: merged), and whether this is a retry of the previous write.
        (
            proptest::collection::btree_map("[a-e]", -3i64..3, 0..3)
                .prop_map(|m| m.into_iter().map(|(k, v)| (k, json!(v))).collect()),
            any::<bool>(),
            any::<bool>(),
        )
    }

    /// A model server: `reconcile` for the state, a change per accepted write, an op
    /// table consulted with `check_op` before reconciling.
    struct Model {
        bucket: Bucket,
        log: Vec<Change>,
        ops: BTreeMap<String, OpRecord>,
        clock: HlcClock,
    }

    impl Model {
        fn new() -> Self {
            let mut clock = HlcClock::new();
            let id = BucketId::parse("device.D1").expect("valid");
            let bucket = Bucket::created(id, Fields::new(), clock.tick(1));
            let log = vec![Change {
                version: 1,
                timestamp: bucket.timestamp.millis,
                outcome: ChangeKind::Created,
                by: "server".into(),
                session: None,
                op_id: None,
                fields: Fields::new(),
            }];
            Model {
                bucket,
                log,
                ops: BTreeMap::new(),
                clock,
            }
        }

        /// (outcome, version, replayed)
        fn put(&mut self, by: &str, r: &UpdateRequest) -> Result<(UpdateOutcome, u64, bool), ()> {
            let op = r.op_id.clone().expect("op id");
            let digest = request_digest(self.bucket.id.as_str(), r);
            match check_op(self.ops.get(&op), by, &digest) {
                OpCheck::Replay(rec) => return Ok((rec.outcome, rec.version, true)),
                OpCheck::Reused => return Err(()),
                OpCheck::New => {}
            }
            let update = Update {
                value: r.value.clone(),
                base_version: r.base_version,
                occ: r.occ,
            };
            let now = self.clock.tick(1);
            let outcome = reconcile(&self.bucket, &update, now);
            let (kind, version, ts) = match &outcome {
                Outcome::Applied(b) | Outcome::Merged(b) => {
                    let kind = if matches!(outcome, Outcome::Applied(_)) {
                        ChangeKind::Applied
                    } else {
                        ChangeKind::Merged
                    };
                    self.log.push(Change {
                        version: b.version,
                        timestamp: b.timestamp.millis,
                        outcome: kind,
                        by: by.into(),
                        session: r.session.clone(),
                        op_id: Some(op.clone()),
                        fields: r.value.clone(),
                    });
                    self.bucket = b.clone();
                    let api = if kind == ChangeKind::Applied {
                        UpdateOutcome::Applied
                    } else {
                        UpdateOutcome::Merged
                    };
                    (api, b.version, b.timestamp)
                }
                Outcome::Refused(_) => (
                    UpdateOutcome::Refused,
                    self.bucket.version,
                    self.bucket.timestamp,
                ),
            };
            self.ops.insert(
                op.clone(),
                OpRecord {
                    op_id: op,
                    bucket: self.bucket.id.to_string(),
                    by: by.into(),
                    digest,
                    outcome: kind,
                    version,
                    timestamp: ts,
                    at_ms: ts.millis,
                },
            );
            Ok((kind, version, false))
        }
    }

    proptest! {
        /// For any sequence of applied and merged writes, the diff from any version the
        /// log still holds, applied to the copy at that version, is the stored value.
        #[test]
        fn a_diff_applied_to_the_held_copy_is_the_stored_value(
            writes in proptest::collection::vec(arb_write(), 1..30),
            keep in 1usize..40)
        {
            let mut m = Model::new();
            let mut copies: BTreeMap<u64, Fields> = BTreeMap::new();
            copies.insert(1, m.bucket.value.clone());
            for (i, (value, current, _)) in writes.iter().enumerate() {
                let base = if *current { m.bucket.version } else { m.bucket.version.saturating_sub(1 + i as u64 % 3) };
                let r = UpdateRequest { value: value.clone(), base_version: base, occ: false,
                    session: None, op_id: Some(format!("w{i}")) };
                m.put("device:D1", &r).expect("fresh op ids are never reused");
                copies.insert(m.bucket.version, m.bucket.value.clone());
            }
            // Retention: only the newest `keep` changes are left.
            let kept: Vec<Change> = m.log.iter().rev().take(keep).rev().cloned().collect();
            let oldest = kept.first().map_or(u64::MAX, |c| c.version);
            for (held, copy) in &copies {
                let diff = diff_since(*held, m.bucket.version, &kept);
                if *held == m.bucket.version {
                    prop_assert!(diff.is_none());
                    continue;
                }
                if *held + 1 >= oldest {
                    let diff = diff.expect("the log reaches the held version");
                    let mut c = copy.clone();
                    apply_diff(&mut c, &diff);
                    prop_assert_eq!(&c, &m.bucket.value);
                    // Exactly the fields changed since: nothing more.
                    for k in diff.keys() {
                        prop_assert!(kept.iter().any(|ch| ch.version > *held && ch.fields.contains_key(k)));
                    }
                } else {
                    prop_assert!(diff.is_none(), "held v{} older than the log (v{})", held, oldest);
                }
            }
        }

        /// Retries with the same op id return the original outcome and are applied at
        /// most once; the log holds exactly one change per op id that was accepted.
        #[test]
        fn op_id_replay_returns_the_original_outcome(
            writes in proptest::collection::vec(arb_write(), 1..30),
            occ in any::<bool>())
        {
            let mut m = Model::new();
            let mut sent: Vec<(UpdateRequest, (UpdateOutcome, u64, bool))> = Vec::new();
            for (i, (value, current, retry)) in writes.iter().enumerate() {
                if *retry && !sent.is_empty() {
                    let j = i % sent.len();
                    let (r, first) = sent[j].clone();
                    let again = m.put("device:D1", &r).expect("same principal and body");
                    prop_assert_eq!((again.0, again.1, again.2), (first.0, first.1, true));
                    // Another body under the same op id is refused, and changes nothing.
                    let before = (m.bucket.clone(), m.log.len());
                    let other = UpdateRequest { base_version: r.base_version + 1000, ..r.clone() };
                    prop_assert!(m.put("device:D1", &other).is_err());
                    prop_assert!(m.put("user:mallory", &r).is_err());
                    prop_assert_eq!((m.bucket.clone(), m.log.len()), before);
                    continue;
                }
                let base = if *current { m.bucket.version } else { 0 };
                let r = UpdateRequest { value: value.clone(), base_version: base, occ,
                    session: Some("s".into()), op_id: Some(format!("op{i}")) };
                let first = m.put("device:D1", &r).expect("new op id");
                prop_assert!(!first.2);
                sent.push((r, first));
            }
            let mut per_op: BTreeMap<String, usize> = BTreeMap::new();
            for c in &m.log {
                if let Some(op) = &c.op_id {
                    *per_op.entry(op.clone()).or_default() += 1;
                }
            }
            prop_assert!(per_op.values().all(|n| *n == 1), "{:?}", per_op);
            let accepted = sent.iter().filter(|(_, (o, _, _))| *o != UpdateOutcome::Refused).count();
            prop_assert_eq!(per_op.len(), accepted);
            prop_assert_eq!(m.bucket.version, 1 + accepted as u64);
            let _ = m.bucket.id.to_string();
        }
    }
}
