//! First contacts on PostgreSQL: a batch of new devices in ONE round trip.
//!
//! `BEGIN`, the credential locks, one data-modifying statement and `COMMIT` are pipelined
//! on one connection and run in that order:
//!
//! 1. `pg_advisory_xact_lock` on every device's `assigned/<serial>` key, in key order —
//!    the lock [`super::lock_record`] takes for `swap_assigned`, so no rotation or
//!    re-registration of one of these devices runs meanwhile (and a batch cannot deadlock
//!    another: both lock in key order);
//! 2. one statement (its snapshot taken after the locks): a device with no assigned
//!    credentials gets its set's lease row inserted (`ON CONFLICT DO NOTHING`: a set ever
//!    leased, or leased by a concurrent actor — whose insert it waits for — is skipped);
//!    only the devices whose lease row it inserted get their credentials, device record,
//!    buckets and changes, so a refused device writes nothing and a set is never written
//!    beside an actor that loaded it;
//! 3. `COMMIT`; the answer is given only once it returned.
//!
//! A statement error rolls everything back (the pipelined `COMMIT` then ends an aborted
//! transaction) and the batch fails; past the deadline the connection is abandoned and
//! the batch's fate is unknown.

use std::collections::HashSet;

use super::{abandon, as_i64, backend, to_json, PostgresStore};
use crate::store::{NewDevice, StoreError};

const LOCK_CREDENTIALS: &str =
    "SELECT count(pg_advisory_xact_lock(hashtext(k))) FROM unnest($1::text[]) AS k";

const REGISTER_NEW: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[], $3::jsonb[]) AS i(set_key, cred, device)
), fresh AS (
    SELECT i.* FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM tether_records r WHERE r.key = 'assigned/' || i.set_key)
), claimed AS (
    INSERT INTO tether_leases (set_key, epoch, owner)
    SELECT set_key, 1, '' FROM fresh
    ON CONFLICT (set_key) DO NOTHING RETURNING set_key
), creds AS (
    INSERT INTO tether_records (key, body)
    SELECT 'assigned/' || f.set_key, f.cred FROM fresh f JOIN claimed c USING (set_key)
), devices AS (
    INSERT INTO tether_devices (device_id, body)
    SELECT f.set_key, f.device FROM fresh f JOIN claimed c USING (set_key)
    ON CONFLICT (device_id) DO UPDATE SET body = jsonb_set(EXCLUDED.body, '{first_seen_ms}',
        coalesce(tether_devices.body -> 'first_seen_ms', EXCLUDED.body -> 'first_seen_ms'))
), buckets AS (
    INSERT INTO tether_buckets (set_key, id, value, ts_ms, ts_logical, version)
    SELECT b.set_key, b.id, b.value, b.ts_ms, b.ts_logical, b.version
    FROM unnest($4::text[], $5::text[], $6::jsonb[], $7::bigint[], $8::bigint[], $9::bigint[])
        AS b(set_key, id, value, ts_ms, ts_logical, version)
    JOIN claimed c USING (set_key)
), changes AS (
    INSERT INTO tether_changes (set_key, id, version, body)
    SELECT ch.set_key, ch.id, ch.version, ch.body
    FROM unnest($10::text[], $11::text[], $12::bigint[], $13::jsonb[])
        AS ch(set_key, id, version, body)
    JOIN claimed c USING (set_key)
)
SELECT set_key FROM claimed";

/// The batch as the statement's columns; devices named twice are refused after the first.
#[derive(Default)]
struct Columns {
    keys: Vec<String>,
    sets: Vec<String>,
    creds: Vec<serde_json::Value>,
    records: Vec<serde_json::Value>,
    b_sets: Vec<String>,
    b_ids: Vec<String>,
    b_values: Vec<serde_json::Value>,
    b_ms: Vec<i64>,
    b_logical: Vec<i64>,
    b_versions: Vec<i64>,
    c_sets: Vec<String>,
    c_ids: Vec<String>,
    c_versions: Vec<i64>,
    c_bodies: Vec<serde_json::Value>,
}

impl Columns {
    fn of(devices: &[NewDevice]) -> Result<Self, StoreError> {
        let mut c = Columns::default();
        let mut seen = HashSet::new();
        for d in devices {
            let set = d.set()?.to_string();
            if !seen.insert(set.clone()) {
                continue;
            }
            c.keys.push(format!("assigned/{set}"));
            c.creds.push(to_json(&d.assigned)?);
            c.records.push(to_json(&d.record)?);
            for b in &d.buckets {
                c.b_sets.push(set.clone());
                c.b_ids.push(b.id.to_string());
                c.b_values.push(to_json(&b.value)?);
                c.b_ms.push(as_i64(b.timestamp.millis)?);
                c.b_logical.push(i64::from(b.timestamp.logical));
                c.b_versions.push(as_i64(b.version)?);
            }
            for (id, ch) in &d.changes {
                c.c_sets.push(set.clone());
                c.c_ids.push(id.to_string());
                c.c_versions.push(as_i64(ch.version)?);
                c.c_bodies.push(to_json(ch)?);
            }
            c.sets.push(set);
        }
        c.keys.sort();
        Ok(c)
    }
}

impl PostgresStore {
    /// [`crate::store::Store::register_new`] on PostgreSQL.
    pub(super) async fn register_batch(
        &self,
        devices: Vec<NewDevice>,
    ) -> Result<Vec<bool>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let cols = Columns::of(&devices)?;
        let mut client = self.client().await?;
        let claimed = match tokio::time::timeout(
            self.deadline,
            Self::register_on(&mut client, &cols),
        )
        .await
        {
            Ok(done) => done?,
            Err(_) => {
                abandon(client);
                return Err(StoreError::FateUnknown(format!(
                    "registration of {} devices: no answer from PostgreSQL within {} ms",
                    devices.len(),
                    self.deadline.as_millis()
                )));
            }
        };
        // A device named twice is written (at most) once, for its first entry.
        let mut answered = HashSet::new();
        devices
            .iter()
            .map(|d| {
                let set = d.set()?.to_string();
                Ok(claimed.contains(&set) && answered.insert(set))
            })
            .collect()
    }

    async fn register_on(
        client: &mut deadpool_postgres::Object,
        cols: &Columns,
    ) -> Result<HashSet<String>, StoreError> {
        let lock = client
            .prepare_cached(LOCK_CREDENTIALS)
            .await
            .map_err(backend)?;
        let register = client.prepare_cached(REGISTER_NEW).await.map_err(backend)?;
        // Pipelined: sent in this order in one round trip, run in this order.
        type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
        let lock_params: [Param<'_>; 1] = [&cols.keys];
        let params: [Param<'_>; 13] = [
            &cols.sets,
            &cols.creds,
            &cols.records,
            &cols.b_sets,
            &cols.b_ids,
            &cols.b_values,
            &cols.b_ms,
            &cols.b_logical,
            &cols.b_versions,
            &cols.c_sets,
            &cols.c_ids,
            &cols.c_versions,
            &cols.c_bodies,
        ];
        let begin = client.batch_execute("BEGIN");
        let locked = client.query_one(&lock, &lock_params);
        let written = client.query(&register, &params);
        let commit = client.batch_execute("COMMIT");
        let (begin, locked, written, commit) = futures::join!(begin, locked, written, commit);
        begin.map_err(backend)?;
        locked.map_err(backend)?;
        // A failed statement aborted the transaction: the COMMIT sent behind it rolled it
        // back, nothing was written.
        let rows = written.map_err(backend)?;
        commit.map_err(backend)?;
        Ok(rows.into_iter().map(|r| r.get::<_, String>(0)).collect())
    }
}
