//! Messages to a bucket set actor carry the span of the request that sent them: actix
//! runs the handler on the actor's arbiter thread, where the caller's span is not current.
//! [`Shared::call`](crate::sets::registry::Shared::call) wraps every message in
//! [`Traced`]; its handler records the mailbox wait (span `actor.mailbox` and
//! `tether_actor_mailbox_wait_seconds`) and runs the message's own handler inside an
//! `actor.{op}` span, child of the request's span, so the actor's work, its log lines and
//! the batch commit's links all belong to the request's trace. Both spans exist only when
//! they are seen (`telemetry::inner_span`); otherwise the handler runs in the request's
//! span.

use std::time::Instant;

use actix::prelude::*;

use crate::sets::actor::{
    BucketSetActor, EnsureBuckets, Get, GetPresence, Put, ReleaseHeld, Shutdown, Subscribe,
    Unsubscribe,
};

/// A message kind's name in spans and metric labels.
pub trait Op {
    /// `put`, `get`, …
    const NAME: &'static str;
    /// The span name of its handling.
    const SPAN: &'static str;
}

macro_rules! ops {
    ($($t:ty => $name:literal),* $(,)?) => {
        $(impl Op for $t {
            const NAME: &'static str = $name;
            const SPAN: &'static str = concat!("actor.", $name);
        })*
    };
}

ops! {
    Put => "put",
    Get => "get",
    EnsureBuckets => "ensure",
    Subscribe => "subscribe",
    Unsubscribe => "unsubscribe",
    ReleaseHeld => "release_held",
    Shutdown => "shutdown",
    GetPresence => "presence",
}

/// A message with its sender's span and the moment it was sent.
#[derive(Debug)]
pub struct Traced<M> {
    msg: M,
    parent: tracing::Span,
    mailbox: tracing::Span,
    sent: Instant,
}

impl<M: Op> Traced<M> {
    /// Wraps `msg`, sent now from the current span.
    pub fn new(msg: M) -> Self {
        let parent = tracing::Span::current();
        let mailbox = crate::telemetry::inner_span(
            &parent,
            || tracing::info_span!(parent: &parent, "actor.mailbox", op = M::NAME),
        );
        Traced {
            msg,
            parent,
            mailbox,
            sent: Instant::now(),
        }
    }
}

impl<M: Message> Message for Traced<M> {
    type Result = M::Result;
}

impl<M: Message + Op> Traced<M> {
    /// Records the mailbox wait and opens the `actor.{op}` span the message is handled in.
    fn arrive(self, actor: &BucketSetActor) -> (M, tracing::Span) {
        let Traced {
            msg,
            parent,
            mailbox,
            sent,
        } = self;
        actor.shared().metrics.mailbox_wait(M::NAME, sent.elapsed());
        // The wait ends here.
        drop(mailbox);
        let span = crate::telemetry::inner_span(
            &parent,
            || tracing::info_span!(parent: &parent, "actor", op = M::NAME, otel.name = M::SPAN),
        );
        (msg, span)
    }
}

macro_rules! traced_handlers {
    ($($t:ty),* $(,)?) => {
        $(impl Handler<Traced<$t>> for BucketSetActor {
            type Result = <BucketSetActor as Handler<$t>>::Result;

            fn handle(&mut self, traced: Traced<$t>, ctx: &mut Context<Self>) -> Self::Result {
                let (msg, span) = traced.arrive(self);
                let _in = span.enter();
                <Self as Handler<$t>>::handle(self, msg, ctx)
            }
        })*
    };
}

traced_handlers!(
    Put,
    Get,
    EnsureBuckets,
    Subscribe,
    Unsubscribe,
    ReleaseHeld,
    Shutdown,
    GetPresence
);
