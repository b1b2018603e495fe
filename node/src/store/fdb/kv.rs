//! The transactional key-value surface the FoundationDB store is written against: what
//! it uses of FDB and nothing more, so the store's logic (key layout, fencing, retries,
//! idempotency) compiles and runs without `libfdb_c`. Two implementations: the
//! `foundationdb` crate (`native.rs`, feature `fdb`) and an in-memory one with FDB's
//! conflict rules and injectable failures (`memory.rs`).

use async_trait::async_trait;

/// FoundationDB error codes the store logic and the in-memory implementation use
/// (<https://apple.github.io/foundationdb/api-error-codes.html>).
pub mod code {
    /// Transaction is too old to perform reads or be committed (retryable).
    pub const TRANSACTION_TOO_OLD: i32 = 1007;
    /// Request for future version (retryable).
    pub const FUTURE_VERSION: i32 = 1009;
    /// Transaction not committed due to conflict with another transaction (retryable).
    pub const NOT_COMMITTED: i32 = 1020;
    /// Transaction may or may not have committed (retryable, maybe committed).
    pub const COMMIT_UNKNOWN_RESULT: i32 = 1021;
    /// Operation aborted because the transaction timed out (not retryable).
    pub const TRANSACTION_TIMED_OUT: i32 = 1031;
    /// Storage process does not have recent mutations (retryable).
    pub const PROCESS_BEHIND: i32 = 1037;
    /// Cluster has been upgraded to a new protocol version (retryable, maybe committed).
    pub const CLUSTER_VERSION_CHANGED: i32 = 1039;
    /// Transaction exceeds byte limit (not retryable).
    pub const TRANSACTION_TOO_LARGE: i32 = 2101;
    /// Key length exceeds limit (not retryable).
    pub const KEY_TOO_LARGE: i32 = 2102;
    /// Value length exceeds limit (not retryable).
    pub const VALUE_TOO_LARGE: i32 = 2103;
}

/// FDB's largest value, in bytes ("Known limitations": values cannot exceed 100,000 bytes).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// FDB's largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 10_000;
/// FDB's largest transaction (keys and values written), in bytes.
pub const MAX_TRANSACTION_BYTES: usize = 10_000_000;

/// A failed key-value operation, classified the way FDB's `fdb_error_predicate` does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FoundationDB error {code}: {message}")]
pub struct KvError {
    /// The FDB error code.
    pub code: i32,
    /// FDB's description of it.
    pub message: String,
    /// A retry of the whole transaction may succeed.
    pub retryable: bool,
    /// The transaction may have committed although it reported an error.
    pub maybe_committed: bool,
}

impl KvError {
    /// The error FDB reports for `code`, classified by FDB's predicates (the codes the
    /// in-memory implementation can produce; any other code is neither retryable nor
    /// maybe committed).
    pub fn fdb(code: i32) -> Self {
        let (message, retryable, maybe_committed) = match code {
            code::TRANSACTION_TOO_OLD => (
                "Transaction is too old to perform reads or be committed",
                true,
                false,
            ),
            code::FUTURE_VERSION => ("Request for future version", true, false),
            code::NOT_COMMITTED => (
                "Transaction not committed due to conflict with another transaction",
                true,
                false,
            ),
            code::COMMIT_UNKNOWN_RESULT => {
                ("Transaction may or may not have committed", true, true)
            }
            code::TRANSACTION_TIMED_OUT => (
                "Operation aborted because the transaction timed out",
                false,
                false,
            ),
            code::PROCESS_BEHIND => (
                "Storage process does not have recent mutations",
                true,
                false,
            ),
            code::CLUSTER_VERSION_CHANGED => (
                "The protocol version of the cluster has changed",
                true,
                true,
            ),
            code::TRANSACTION_TOO_LARGE => ("Transaction exceeds byte limit", false, false),
            code::KEY_TOO_LARGE => ("Key length exceeds limit", false, false),
            code::VALUE_TOO_LARGE => ("Value length exceeds limit", false, false),
            _ => ("unknown error", false, false),
        };
        KvError {
            code,
            message: message.into(),
            retryable,
            maybe_committed,
        }
    }
}

/// One page of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeChunk {
    /// Key-value pairs in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// More pairs follow the last one in the range asked for.
    pub more: bool,
}

/// A database: the source of transactions.
pub trait KvDatabase: Send + Sync + 'static {
    /// Its transactions.
    type Trx: KvTransaction;
    /// Starts a transaction (FDB: `fdb_database_create_transaction`).
    fn begin(&self) -> Result<Self::Trx, KvError>;
}

/// A serializable transaction with read-your-writes, as FDB's: reads add read conflicts on
/// what they read, and the commit fails with `not_committed` when anything read was
/// written by another transaction committed since this one's read version.
#[async_trait]
pub trait KvTransaction: Sized + Send + Sync + 'static {
    /// The value of `key` (a serializable read).
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` pairs with `begin <= key < end`, in key order (a serializable read of
    /// the range covered).
    async fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeChunk, KvError>;
    /// Writes `value` under `key` at commit.
    fn set(&self, key: &[u8], value: &[u8]);
    /// Removes `key` at commit.
    fn clear(&self, key: &[u8]);
    /// Removes every key in `begin..end` at commit.
    fn clear_range(&self, begin: &[u8], end: &[u8]);
    /// Adds `delta` to the little-endian 64-bit integer under `key` at commit (FDB's
    /// `MutationType::Add`): a write without a read, so it causes no conflict itself.
    fn atomic_add(&self, key: &[u8], delta: i64);
    /// Commits. An error with `maybe_committed` leaves the outcome unknown.
    async fn commit(self) -> Result<(), KvError>;
}
