//! The transitions: which steps are enabled in a state, and what each does.
//!
//! Each step is one thing that happens atomically in the real system: a message handled
//! by an actor (actix runs one handler at a time), a store transaction, a tick of time.
//! A node taking no step while others do is a pause; nothing else marks it, so every
//! pause of every length at every point is among the interleavings checked.

use crate::state::*;
use crate::{Bug, Ownership, Rules};

impl Ownership {
    /// Nothing leased, nothing written, no actor, nothing in flight.
    pub(crate) fn initial(&self) -> State {
        let row = SetRow {
            epoch: 0,
            holder: None,
            value: Vec::new(),
            holders: Vec::new(),
            commits: Vec::new(),
            acked: 0,
            activations: 0,
        };
        let client = Client {
            sent: 0,
            busy: false,
            reads: Vec::new(),
        };
        State {
            sets: vec![row; usize::from(self.sets)],
            actors: vec![None; usize::from(self.nodes) * usize::from(self.sets)],
            served: vec![0; usize::from(self.nodes) * usize::from(self.sets)],
            uncertain: vec![None; usize::from(self.nodes) * usize::from(self.sets)],
            net: Vec::new(),
            clients: vec![client; usize::from(self.clients)],
        }
    }

    fn slot(&self, node: NodeId, set: SetId) -> usize {
        usize::from(node) * usize::from(self.sets) + usize::from(set)
    }

    /// The actor of `set` on `node`, if any.
    pub fn actor<'s>(&self, s: &'s State, node: NodeId, set: SetId) -> Option<&'s Actor> {
        s.actors[self.slot(node, set)].as_ref()
    }

    /// Every step enabled in `s`, in a fixed order.
    ///
    /// Symmetry: nodes that appear nowhere in `s` are interchangeable (the state is the
    /// same with any two of them swapped), and so are clients that sent nothing; only
    /// the first of each may make a first step. The steps left out lead to the same
    /// states with ids renamed, and no property depends on an id.
    pub(crate) fn enabled(&self, s: &State, out: &mut Vec<Action>) {
        out.push(Action::Tick);
        let first_fresh = (0..self.nodes).find(|n| self.fresh(s, *n));
        for node in 0..self.nodes {
            for set in 0..self.sets {
                let Some(a) = self.actor(s, node, set) else {
                    let budget = s.sets[usize::from(set)].activations < self.activations_per_set;
                    let renamed = self.fresh(s, node) && first_fresh != Some(node);
                    if budget && !renamed {
                        out.push(Action::Activate { node, set });
                    }
                    continue;
                };
                match a.phase {
                    Phase::Acquiring { .. } => {
                        if self.faults.failed_activations {
                            out.push(Action::ActivationFails { node, set });
                            if self.planted(Bug::LoadBeforeTakeOver) && answered(s, node, set, a) {
                                out.push(Action::LoadFails { node, set });
                            }
                        }
                    }
                    Phase::TakingOver { .. } => {
                        if self.take_over_waited(s, node, set, a) {
                            out.push(Action::TakeOverWaitEnds { node, set });
                        }
                    }
                    Phase::Serving => out.push(Action::Stop { node, set }),
                    Phase::Stopping => {}
                }
                if a.commit.is_some() && self.faults.commit_fate_unknown {
                    out.push(Action::CommitFateUnknown { node, set });
                }
            }
        }
        let first_fresh = s.clients.iter().position(|c| c.sent == 0);
        for (client, c) in (0..).zip(&s.clients) {
            if c.busy || c.sent >= self.ops_per_client {
                continue;
            }
            if c.sent == 0 && first_fresh != Some(usize::from(client)) {
                continue;
            }
            for node in 0..self.nodes {
                for set in 0..self.sets {
                    let Some(a) = self.actor(s, node, set) else {
                        continue;
                    };
                    if a.phase != Phase::Serving {
                        // Refused (`ready`: moving, not loaded) or queued behind the
                        // activation (`ctx.wait`): the client tries again, anywhere.
                        continue;
                    }
                    out.push(Action::Request {
                        client,
                        node,
                        set,
                        op: Op::Read,
                    });
                    if a.commit.is_none() {
                        out.push(Action::Request {
                            client,
                            node,
                            set,
                            op: Op::Write,
                        });
                    }
                }
            }
        }
        for (i, m) in s.net.iter().enumerate() {
            if i > 0 && s.net[i - 1] == *m {
                continue; // a copy of the previous one: the same steps
            }
            if self.deliverable(s, m) {
                out.push(Action::Deliver(m.clone()));
            }
        }
    }

    /// Whether `node` appears nowhere in `s`: no actor, never a lease holder, in no
    /// message.
    fn fresh(&self, s: &State, node: NodeId) -> bool {
        (0..self.sets).all(|set| {
            self.actor(s, node, set).is_none() && s.uncertain[self.slot(node, set)].is_none()
        }) && s.sets.iter().all(|row| {
            row.holder != Some(node)
                && !row.holders.contains(&node)
                && row.commits.iter().all(|c| c.node != node)
        }) && s.net.iter().all(|m| !m.mentions(node))
    }

    /// Whether `m` can be handled now. A `Relinquish` waits while its recipient's actor
    /// is activating (`ctx.wait`: the `Shutdown` it sends is handled after).
    fn deliverable(&self, s: &State, m: &Msg) -> bool {
        match *m {
            Msg::Relinquish { set, to, .. } => !matches!(
                self.actor(s, to, set).map(|a| a.phase),
                Some(Phase::Acquiring { .. } | Phase::TakingOver { .. })
            ),
            _ => true,
        }
    }

    /// Whether a taking-over actor has waited `TAKE_OVER_WAIT` (under the real rules, when
    /// it took the lease from its own node: until the node's mark of an unanswered lease
    /// request expired).
    fn take_over_waited(&self, s: &State, node: NodeId, set: SetId, a: &Actor) -> bool {
        let Phase::TakingOver {
            taken,
            acquired,
            previous,
        } = a.phase
        else {
            return false;
        };
        if previous == node && self.fixed() {
            return s.uncertain[self.slot(node, set)].is_none();
        }
        let since = if self.planted(Bug::WaitFromRequest) {
            taken
        } else {
            acquired
        };
        since >= self.take_over_wait
    }

    /// The state after `action`, or `None` when it changes nothing.
    pub(crate) fn apply(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        match action {
            Action::Tick => {
                if !self.tick(&mut s) {
                    return None;
                }
            }
            Action::Activate { node, set } => self.activate(&mut s, node, set),
            Action::Deliver(m) => {
                if !self.deliverable(&s, &m) {
                    return None;
                }
                take(&mut s.net, &m);
                self.deliver(&mut s, m);
            }
            Action::TakeOverWaitEnds { node, set } => {
                let slot = self.slot(node, set);
                let a = s.actors[slot].as_ref()?;
                let Phase::TakingOver { taken, .. } = a.phase else {
                    return None;
                };
                if !self.take_over_waited(&s, node, set, a) {
                    return None;
                }
                self.serve(&mut s, node, set, taken);
            }
            Action::Stop { node, set } => self.stop(&mut s, node, set),
            Action::Request {
                client,
                node,
                set,
                op,
            } => self.request(&mut s, client, node, set, op),
            Action::CommitFateUnknown { node, set } => {
                let slot = self.slot(node, set);
                let commit = s.actors[slot].as_mut()?.commit.take()?;
                // `finish_commit`: `may_have_written` → 503, `epoch = None`, stop.
                if let Some(client) = commit.client {
                    s.clients[usize::from(client)].busy = false;
                }
                self.drop_actor(&mut s, node, set);
            }
            Action::ActivationFails { node, set } => {
                // `started`: `acquire_lease` errs without an answer (before the fix of
                // defect 16 also: `load_set` errs after it) and returns before
                // `take_over`; the actor stops. The real rules mark the set
                // (`lease_fate_unknown`) from now on.
                let slot = self.slot(node, set);
                let tag = s.actors[slot].as_ref()?.tag;
                if self.fixed() && !self.planted(Bug::ForgetUnansweredLease) {
                    s.uncertain[slot] = Some(0);
                }
                if !self.faults.late_lease_landing {
                    // It landed already, or it never will.
                    take(&mut s.net, &Msg::Acquire { set, node, tag });
                }
                self.drop_actor(&mut s, node, set);
            }
            Action::LoadFails { node, set } => {
                // `Bug::LoadBeforeTakeOver`: `load_set` errs after the lease's answer and
                // `started` returns before `take_over`; no mark (the lease was answered).
                self.drop_actor(&mut s, node, set);
            }
        }
        Some(s)
    }

    /// Time passes: every age grows, up to the horizon. `false` if none could.
    fn tick(&self, s: &mut State) -> bool {
        let horizon = self.horizon();
        let mut aged = false;
        let mut age = |a: &mut Age| {
            if *a < horizon {
                *a += 1;
                aged = true;
            }
        };
        for mark in &mut s.uncertain {
            if let Some(m) = mark {
                age(m);
                if *m >= self.take_over_wait {
                    // `uncertain_until` is past: as if never marked.
                    *mark = None;
                }
            }
        }
        for a in s.actors.iter_mut().flatten() {
            age(&mut a.confirmed);
            match &mut a.phase {
                Phase::Acquiring { taken } => age(taken),
                Phase::TakingOver {
                    taken, acquired, ..
                } => {
                    age(taken);
                    age(acquired);
                }
                Phase::Serving | Phase::Stopping => {}
            }
            if let Some(c) = &mut a.commit {
                age(&mut c.started);
            }
            for r in &mut a.reads {
                age(&mut r.sent);
            }
        }
        aged
    }

    /// `Shared::actor` starts the set's actor; its `started` sends `acquire_lease` and
    /// handles no message until the set is loaded and taken over (`ctx.wait`).
    fn activate(&self, s: &mut State, node: NodeId, set: SetId) {
        let row = &mut s.sets[usize::from(set)];
        let tag = row.activations;
        row.activations += 1;
        s.actors[self.slot(node, set)] = Some(Actor {
            tag,
            phase: Phase::Acquiring { taken: 0 },
            epoch: 0,
            memory: Vec::new(),
            confirmed: self.horizon(),
            commit: None,
            reads: Vec::new(),
        });
        send(&mut s.net, Msg::Acquire { set, node, tag });
    }

    /// A message arrives: at the store (a transaction), or at a node.
    fn deliver(&self, s: &mut State, m: Msg) {
        match m {
            Msg::Acquire { set, node, tag } => {
                // `Store::acquire_lease` (postgres.rs: `FOR UPDATE`, epoch + 1, owner;
                // fdb/mod.rs the same in one transaction), then `load_set`.
                let row = &mut s.sets[usize::from(set)];
                row.epoch += 1;
                let previous = if self.rules == Rules::HandOverByEpoch {
                    row.holder
                } else {
                    // `previous.filter(|p| p != owner …)`: itself is no previous owner.
                    row.holder.filter(|h| *h != node)
                };
                row.holder = Some(node);
                row.holders.push(node);
                let reply = Msg::Acquired {
                    set,
                    node,
                    tag,
                    epoch: row.epoch,
                    previous,
                    value: row.value.clone(),
                };
                self.answer(s, reply);
            }
            Msg::Acquired {
                set,
                node,
                tag,
                epoch,
                previous,
                value,
            } => {
                let slot = self.slot(node, set);
                let Some(a) = s.actors[slot].as_mut().filter(|a| a.tag == tag) else {
                    return; // its actor is gone: nobody waits for this answer
                };
                let Phase::Acquiring { taken } = a.phase else {
                    return;
                };
                a.epoch = epoch;
                a.memory = value;
                // The real rules: the store names no previous owner, but a lease request
                // of this node had no answer lately (`uncertain_until`): whoever held the
                // set before that request was never told to stop, so it is waited out.
                let uncertain = self.fixed() && s.uncertain[slot].is_some();
                let previous = previous.or(uncertain.then_some(node));
                let Some(p) = previous.filter(|_| !self.planted(Bug::ServeAtOnce)) else {
                    self.serve(s, node, set, taken);
                    return;
                };
                a.phase = Phase::TakingOver {
                    taken,
                    acquired: 0,
                    previous: p,
                };
                if p != node {
                    // `Shared::take_over`: ask the previous holder to stop serving.
                    let ask = Msg::Relinquish {
                        set,
                        from: node,
                        to: p,
                        tag,
                        epoch: epoch - 1,
                    };
                    send(&mut s.net, ask);
                } else if self.rules == Rules::HandOverByEpoch && s.served[slot] == epoch - 1 {
                    // `HandOverByEpoch`: this node served the epoch before, so its own
                    // take-over of the one before that is done.
                    self.serve(s, node, set, taken);
                }
            }
            Msg::Commit {
                set,
                node,
                tag,
                epoch,
                value,
            } => {
                // `Store::commit`: the lease row read in the commit's own transaction
                // (postgres.rs `FOR SHARE`, fdb/mod.rs `commit_in`); a stale epoch writes
                // nothing and answers `Fenced`.
                let row = &mut s.sets[usize::from(set)];
                let current = epoch == row.epoch;
                let ok = current || self.planted(Bug::SkipEpochCheck);
                if ok {
                    if let Some(&write) = value.last() {
                        row.commits.push(Landed {
                            node,
                            epoch,
                            lease: row.epoch,
                            write,
                        });
                    }
                    row.value = value;
                }
                self.answer(s, Msg::Committed { set, node, tag, ok });
            }
            Msg::Committed { set, node, tag, ok } => self.committed(s, node, set, tag, ok),
            Msg::Confirm {
                set,
                node,
                tag,
                client,
            } => {
                // `Store::lease_epoch`: one read of the lease row.
                let epoch = s.sets[usize::from(set)].epoch;
                let reply = Msg::Confirmed {
                    set,
                    node,
                    tag,
                    client,
                    epoch,
                };
                self.answer(s, reply);
            }
            Msg::Confirmed {
                set,
                node,
                tag,
                client,
                epoch,
            } => self.confirmed(s, node, set, tag, client, epoch),
            Msg::Relinquish {
                set,
                from,
                to,
                tag,
                epoch,
            } => {
                // `SetsService::relinquish` → `Shared::relinquish`: the set's actor, if
                // any, handles `Shutdown`; answered once it has (or there is none).
                if self.actor(s, to, set).map(|a| a.phase) == Some(Phase::Serving) {
                    self.stop(s, to, set);
                }
                let confirmed = match self.rules {
                    // `relinquish` returns `uncertain_until(set).is_none()`.
                    Rules::Real | Rules::Planted(_) => s.uncertain[self.slot(to, set)].is_none(),
                    Rules::BeforeDefect16 => true,
                    Rules::HandOverByEpoch => s.served[self.slot(to, set)] == epoch,
                };
                let reply = Msg::Relinquished {
                    set,
                    from: to,
                    to: from,
                    tag,
                    confirmed,
                };
                self.answer(s, reply);
            }
            Msg::Relinquished {
                set,
                to,
                tag,
                confirmed,
                ..
            } => {
                // `take_over`: `stop_serving` resolved `true`; on `false` (a lease fate
                // unknown on the previous holder, or under `HandOverByEpoch` an epoch it
                // did not serve) the new holder waits out `TAKE_OVER_WAIT`.
                let slot = self.slot(to, set);
                let Some(a) = s.actors[slot].as_ref().filter(|a| a.tag == tag) else {
                    return;
                };
                if let Phase::TakingOver { taken, .. } = a.phase {
                    if confirmed {
                        self.serve(s, to, set, taken);
                    }
                }
            }
        }
    }

    /// A commit's answer reaches its actor (`start_commit`'s continuation,
    /// `finish_commit`).
    fn committed(&self, s: &mut State, node: NodeId, set: SetId, tag: Tag, ok: bool) {
        let slot = self.slot(node, set);
        let Some(a) = s.actors[slot].as_mut().filter(|a| a.tag == tag) else {
            return;
        };
        let Some(commit) = a.commit.take() else {
            return;
        };
        if !ok {
            // `Fenced`: the batch fails unacknowledged, `epoch = None`, the actor stops.
            if let Some(client) = commit.client {
                s.clients[usize::from(client)].busy = false;
            }
            self.drop_actor(s, node, set);
            return;
        }
        // Committed under its epoch: memory moves on, the lease is proven as of when the
        // commit was sent (`confirmed.max(started)`), the write is acknowledged.
        a.memory.push(commit.write);
        a.confirmed = a.confirmed.min(self.proof(commit.started));
        let stopping = a.phase == Phase::Stopping;
        if let Some(client) = commit.client {
            ack(s, client, set, commit.write);
        }
        if stopping {
            self.drop_actor(s, node, set);
        }
    }

    /// A confirmation's answer reaches its actor (`confirm_lease`, then `under_lease`).
    fn confirmed(
        &self,
        s: &mut State,
        node: NodeId,
        set: SetId,
        tag: Tag,
        client: ClientId,
        epoch: u8,
    ) {
        let slot = self.slot(node, set);
        let Some(a) = s.actors[slot].as_mut().filter(|a| a.tag == tag) else {
            return;
        };
        let Some(i) = a.reads.iter().position(|r| r.client == client) else {
            return;
        };
        let read = a.reads.remove(i);
        if a.phase != Phase::Serving {
            // `act.ready()?`: moving.
            s.clients[usize::from(client)].busy = false;
            return;
        }
        if epoch != a.epoch {
            // Another node took the lease: drop the set, route the read again.
            s.clients[usize::from(client)].busy = false;
            self.drop_actor(s, node, set);
            return;
        }
        a.confirmed = a.confirmed.min(self.proof(read.sent));
        if a.confirmed < self.lease_trust {
            let seen = writes_in(&a.memory);
            observe(s, client, set, read.floor, seen);
        } else {
            // "confirming the lease … took too long; retry"
            s.clients[usize::from(client)].busy = false;
        }
    }

    /// `Shutdown`: refuse everything from now on, fail the reads waiting, finish the
    /// commit in flight (`stopping` keeps the actor running for it), stop.
    fn stop(&self, s: &mut State, node: NodeId, set: SetId) {
        let slot = self.slot(node, set);
        let Some(a) = s.actors[slot].as_mut() else {
            return;
        };
        if a.phase != Phase::Serving {
            return;
        }
        for r in std::mem::take(&mut a.reads) {
            s.clients[usize::from(r.client)].busy = false;
        }
        if a.commit.is_some() {
            a.phase = Phase::Stopping;
        } else {
            self.remove(s, node, set);
        }
    }

    /// A client's request reaches a serving actor (`Handler<Put>`, `Handler<Get>`).
    fn request(&self, s: &mut State, client: ClientId, node: NodeId, set: SetId, op: Op) {
        let slot = self.slot(node, set);
        let floor = s.sets[usize::from(set)].acked;
        let c = &mut s.clients[usize::from(client)];
        let write = client * self.ops_per_client + c.sent;
        c.sent += 1;
        let Some(a) = s.actors[slot].as_mut() else {
            return;
        };
        match op {
            Op::Write => {
                // `start_commit`: reconcile against memory, commit under the epoch. No
                // trust needed: the store fences.
                let mut value = a.memory.clone();
                value.push(write);
                let commit = Msg::Commit {
                    set,
                    node,
                    tag: a.tag,
                    epoch: a.epoch,
                    value,
                };
                send(&mut s.net, commit);
                if self.planted(Bug::AckBeforeDurable) {
                    a.commit = Some(PendingCommit {
                        write,
                        client: None,
                        started: 0,
                    });
                    ack(s, client, set, write);
                } else {
                    a.commit = Some(PendingCommit {
                        write,
                        client: Some(client),
                        started: 0,
                    });
                    s.clients[usize::from(client)].busy = true;
                }
            }
            Op::Read => {
                // `under_lease`: from memory while `lease_trusted`, else after
                // `confirm_lease`.
                let trusted =
                    self.planted(Bug::ReadWithoutConfirm) || a.confirmed < self.lease_trust;
                if trusted {
                    let seen = writes_in(&a.memory);
                    observe(s, client, set, floor, seen);
                } else {
                    let confirm = Msg::Confirm {
                        set,
                        node,
                        tag: a.tag,
                        client,
                    };
                    send(&mut s.net, confirm);
                    a.reads.push(PendingRead {
                        client,
                        floor,
                        sent: 0,
                    });
                    s.clients[usize::from(client)].busy = true;
                }
            }
        }
    }

    /// The actor is gone (stopped with its lease lost, its commit's fate unknown, its
    /// activation failed): whoever waited on it gets an error.
    fn drop_actor(&self, s: &mut State, node: NodeId, set: SetId) {
        if let Some(a) = self.remove(s, node, set) {
            for r in &a.reads {
                s.clients[usize::from(r.client)].busy = false;
            }
            if let Some(client) = a.commit.and_then(|c| c.client) {
                s.clients[usize::from(client)].busy = false;
            }
        }
    }

    /// The actor of `set` on `node` is gone; so are the answers on their way to it
    /// (nobody would read them).
    fn remove(&self, s: &mut State, node: NodeId, set: SetId) -> Option<Actor> {
        let a = s.actors[self.slot(node, set)].take()?;
        s.net.retain(|m| m.addressee() != Some((node, set, a.tag)));
        Some(a)
    }

    /// The take-over is done (confirmed, waited out, or there was no other holder): the
    /// actor serves, its lease proven as of when it sent the lease request, `taken` ago
    /// (`act.confirmed = Some(taken)`).
    fn serve(&self, s: &mut State, node: NodeId, set: SetId, taken: Age) {
        let slot = self.slot(node, set);
        let Some(a) = s.actors[slot].as_mut() else {
            return;
        };
        a.phase = Phase::Serving;
        a.confirmed = self.proof(taken);
        if self.rules == Rules::HandOverByEpoch {
            s.served[slot] = a.epoch;
        }
    }

    /// How long ago a store round trip sent `sent` ago proved the lease: when it was sent
    /// (the answer only shows the lease was current at some point after that).
    fn proof(&self, sent: Age) -> Age {
        if self.planted(Bug::ProofFromAnswer) {
            0
        } else {
            sent
        }
    }

    /// Sends an answer, unless the actor it is for is gone.
    fn answer(&self, s: &mut State, m: Msg) {
        let waiting = m
            .addressee()
            .is_none_or(|(node, set, tag)| self.actor(s, node, set).is_some_and(|a| a.tag == tag));
        if waiting {
            send(&mut s.net, m);
        }
    }
}

/// Whether the store's answer to `a`'s lease request is on its way to it.
fn answered(s: &State, node: NodeId, set: SetId, a: &Actor) -> bool {
    s.net
        .iter()
        .any(|m| matches!(m, Msg::Acquired { .. }) && m.addressee() == Some((node, set, a.tag)))
}

/// `client`'s write is acknowledged.
fn ack(s: &mut State, client: ClientId, set: SetId, write: WriteId) {
    s.sets[usize::from(set)].acked |= bit(write);
    s.clients[usize::from(client)].busy = false;
}

/// `client`'s read is answered with `seen`.
fn observe(s: &mut State, client: ClientId, set: SetId, floor: Writes, seen: Writes) {
    let c = &mut s.clients[usize::from(client)];
    c.reads.push(Observation { set, floor, seen });
    c.busy = false;
}

/// Puts `m` in flight.
fn send(net: &mut Vec<Msg>, m: Msg) {
    let at = net.partition_point(|x| *x < m);
    net.insert(at, m);
}

/// Takes one copy of `m` out of flight.
fn take(net: &mut Vec<Msg>, m: &Msg) {
    if let Ok(at) = net.binary_search(m) {
        net.remove(at);
    }
}
