//! What a node's bucket sets take from their environment: the wall clock and the threads
//! their actors run on. A real node uses the system clock and a few actix arbiters (one
//! thread each); the cluster simulator (`tether-chaos simulate`, ARCHITECTURE.md "The
//! cluster simulator") gives every simulated node a clock of its own (virtual time plus an
//! offset) and runs its actors on the simulated host's thread, so a run is a pure
//! function of its seed.
//!
//! Everything else that reads time in the sets and routing layers reads
//! `tokio::time::Instant`, which is the monotonic clock of a real runtime and the virtual
//! clock of a simulated one.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::dev::channel;
use actix::prelude::*;
use tokio::sync::mpsc;

/// The wall clock hybrid timestamps are built on.
pub trait WallClock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Where a node's bucket-set actors run.
#[derive(Debug, Clone)]
pub enum ActorThreads {
    /// On this many actix arbiters (threads of their own), a set always on the same one;
    /// 0: on the arbiter of the thread that builds the node's shared state (the node's
    /// main thread, beside the store's client and, with `--cluster-threads 0`, the
    /// cluster's internal port).
    Arbiters(usize),
    /// On the thread of the [`LocalActors`] handle, inside its `LocalSet` (simulation).
    Local(LocalActors),
}

/// A node's environment: see the module's documentation.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// The wall clock of bucket timestamps.
    pub clock: Arc<dyn WallClock>,
    /// Where actors run.
    pub actors: ActorThreads,
}

impl NodeEnv {
    /// A real node: the system clock, actors on `shards` arbiters.
    pub fn system(shards: usize) -> NodeEnv {
        NodeEnv {
            clock: Arc::new(SystemClock),
            actors: ActorThreads::Arbiters(shards),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Starts actors on one thread's `LocalSet`, from any task or thread: what an actix
/// arbiter does, without a thread of its own. Made inside the `LocalSet` it serves
/// ([`LocalActors::start`]); once that set is gone (a simulated host crashed), nothing
/// starts and the addresses handed out are disconnected.
#[derive(Clone)]
pub struct LocalActors {
    jobs: mpsc::UnboundedSender<Job>,
}

impl fmt::Debug for LocalActors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalActors")
            .field("alive", &!self.jobs.is_closed())
            .finish()
    }
}

impl LocalActors {
    /// Serves the current `LocalSet`.
    ///
    /// # Panics
    /// Outside a `LocalSet` (as `tokio::task::spawn_local` does).
    pub fn start() -> LocalActors {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        tokio::task::spawn_local(async move {
            while let Some(job) = rx.recv().await {
                job();
            }
        });
        LocalActors { jobs }
    }

    /// Starts the actor `make` builds, as `Actor::start_in_arbiter` does on an arbiter.
    pub fn start_actor<A, F>(&self, make: F) -> Addr<A>
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        // actix's mailbox capacity (`actix::address::DEFAULT_CAPACITY`, not exported).
        let (tx, rx) = channel::channel(16);
        let _ = self.jobs.send(Box::new(move || {
            let mut ctx = Context::with_receiver(rx);
            let actor = make(&mut ctx);
            tokio::task::spawn_local(ctx.into_future(actor));
        }));
        Addr::new(tx)
    }
}
