//! One bilinear op outsourced to the three servers' untrusted sides (section 3.3 of Goten):
//!
//! 1. The enclave quantises both operands ([`crate::quant`]) and shares them: `A = A0 + A1`,
//!    `B = B0 + B1` (`A0, B0` uniform; in Goten, from a stream servers 0 and 1 share), and masks
//!    them with Beaver-style `U, V` (uniform; a stream shared with server 2): `E = A - U`,
//!    `F = B - V`. Output masks `CM0, CM1, CMZ` are uniform too.
//! 2. Server 0's device computes `C0 = op(A0, F) + op(E, B0 - F) - CM0` (that is
//!    `op(A0, F) + op(E, B0) - op(E, F) - CM0` in two products), server 1's
//!    `C1 = op(A1, F) + op(E, B1) - CM1`, server 2's `Z = op(U, V) - CMZ`.
//! 3. The enclave adds `C0 + C1 + Z + CM0 + CM1 + CMZ = op(A, B)` (mod p), checks it
//!    ([`crate::ops`]) and dequantises it.
//!
//! What each untrusted side holds: server 0 `A0, B0, E, F, CM0`; server 1 `A1, B1, E, F, CM1`;
//! server 2 `U, V, CMZ`; each set is uniform and independent of the data (A0 and A1 are each
//! uniform, and E is uniform given either since U is). Any two servers together reconstruct the
//! operands (A0 + A1, or E + U): Goten needs all three not to collude.
//!
//! In one process the enclaves of servers 0 and 1, which in Goten hold the same plaintext and
//! compute the same values, are one enclave (this one); the three untrusted sides are separate,
//! and every value sent to each is in the transcript under its server's name. With
//! [`Servers::replicated`] they are two processes, as in Goten ([`crate::replica`]): each drives
//! its own server's side (enclave 0 server 2's too) and they swap partial results.

use crate::field;
use crate::ops::Op;
use crate::quant::{self, Quantised};
use crate::replica::{operands_digest, Replica, SharedKeys};
use crate::server;
use std::sync::Arc;
use std::time::Instant;
use trustsplit_attacks::Recorder;
use trustsplit_boundary::{Channel, ChannelError, ReleaseInfo, Released, Transcript};
use trustsplit_cryptgpu::prg::Prg;

const SCHEME: &str = "goten";

/// What one untrusted side was sent: `(kind, values)` in order.
type View = Vec<(String, Vec<u64>)>;

/// An untrusted side: a server's host and device, which see only what they are sent.
#[derive(Default)]
struct UntrustedSide {
    seconds: f64,
    bytes_in: u64,
    bytes_out: u64,
    requests: u64,
}

/// Server 2's product for one op, made ahead of time: `Z = op(U, V) - CMZ` with `U, V, CMZ`
/// expanded from `key` (which the enclaves and server 2 hold; server 2 expands it offline, the
/// enclave again when the op comes).
struct Triple {
    layer: String,
    op: Op,
    key: [u8; 32],
    /// Its number on server 2.
    id: u64,
    /// `Z`, where server 2 runs in this process (a remote server 2 keeps it).
    z: Option<Vec<u64>>,
    bytes: u64,
}

/// Goten's offline mode: server 2's products for a known schedule of shapes, made before the
/// step that uses them, so that only servers 0 and 1 are online during a step.
#[derive(Default)]
pub struct Offline {
    ready: std::collections::VecDeque<Triple>,
    /// The ops of the step being run (with their layers), in order: the next step's schedule.
    schedule: Vec<(String, Op)>,
    /// Bytes of `Z` stored now, and at most.
    pub stored_bytes: u64,
    pub peak_stored_bytes: u64,
    /// Products made ahead of time, and ops that found none ready (run online, with server 2).
    pub precomputed: u64,
    pub online: u64,
    /// Seconds server 2 spent making them.
    pub seconds: f64,
}

/// Where a server's untrusted side runs.
pub enum Side {
    /// In this process.
    Local,
    /// A `trustsplit goten-server` process behind an authenticated, encrypted link.
    Remote { link: Box<dyn Channel + Send>, name: String },
}

/// The enclave's side of the protocol and the three untrusted sides it drives.
pub struct Servers {
    sides: [UntrustedSide; 3],
    links: [Side; 3],
    /// The number of the next offline product.
    next_triple: u64,
    transcript: Arc<Transcript>,
    /// `A0, B0` (in Goten, common to servers 0 and 1).
    shares: Prg,
    /// `U, V` (in Goten, common to servers 0, 1 and 2).
    beaver: Prg,
    /// `CM0, CM1, CMZ` (in Goten, common to the three enclaves).
    masks: Prg,
    /// Stochastic rounding noise: its own stream (Goten's prototype reuses the mask's bits).
    rounding: Prg,
    /// The random vectors of the result checks: the enclave's alone.
    checks: Prg,
    /// Results that wrapped around the field and were recomputed in the enclave.
    pub recomputed: u64,
    /// Multiply-adds the servers' devices computed (five products per op), and the enclave's
    /// (the checks, and products recomputed after a wrap).
    pub device_macs: u64,
    pub enclave_macs: u64,
    pub ops: u64,
    /// Set in the offline mode.
    pub offline: Option<Offline>,
    /// Enclave seconds by phase: quantise, share, masks, reconstruct, check, dequantise.
    pub phases: std::collections::BTreeMap<&'static str, f64>,
    /// Every value each untrusted side was sent, by name, when recording (tests; the attacks of
    /// the privacy report).
    views: Option<[View; 3]>,
    /// In-process untrusted sides that keep their requests, as their owners could.
    recorders: Option<[Arc<Recorder>; 3]>,
    /// Set when this is one of two enclaves (servers 0 and 1) in processes of their own.
    replica: Option<Replica>,
}

/// Totals over the three untrusted sides.
#[derive(Clone, Copy, Debug, Default)]
pub struct SideTotals {
    /// Wall time the three sides computed, added up (they run one after the other here; in
    /// Goten, on three machines, concurrently).
    pub seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub requests: u64,
}

fn key() -> Result<[u8; 32], String> {
    Prg::os_key()
}

impl Servers {
    /// Fresh streams keyed from the OS.
    pub fn new(transcript: Arc<Transcript>) -> Result<Servers, String> {
        Servers::with_sides(transcript, [Side::Local, Side::Local, Side::Local])
    }

    /// Servers whose untrusted sides are `links` (server 0, 1, 2).
    pub fn with_sides(transcript: Arc<Transcript>, links: [Side; 3]) -> Result<Servers, String> {
        Ok(Servers {
            sides: Default::default(),
            links,
            next_triple: 0,
            transcript,
            shares: Prg::from_key(key()?),
            beaver: Prg::from_key(key()?),
            masks: Prg::from_key(key()?),
            rounding: Prg::from_key(key()?),
            checks: Prg::from_key(key()?),
            recomputed: 0,
            device_macs: 0,
            enclave_macs: 0,
            ops: 0,
            offline: None,
            phases: Default::default(),
            views: None,
            recorders: None,
            replica: None,
        })
    }

    /// The enclave of server `replica.role` (0 or 1) in a process of its own, sharing `keys`'
    /// streams with the other enclave; it drives its own server's untrusted side (in this
    /// process) and, as enclave 0, server 2's (`server2`). A `Side::Local` server 2 shares server
    /// 0's host, which then holds both `E` and `U`: for tests only (the command line always
    /// reaches a `goten-server` process).
    pub fn replicated(
        transcript: Arc<Transcript>,
        replica: Replica,
        keys: SharedKeys,
        server2: Side,
    ) -> Result<Servers, String> {
        if replica.role == 1 && matches!(server2, Side::Remote { .. }) {
            return Err("enclave 1 does not reach server 2: enclave 0 drives it and hands on its Z".into());
        }
        let mut servers = Servers::with_sides(transcript, [Side::Local, Side::Local, server2])?;
        servers.shares = Prg::from_key(keys.shares);
        servers.beaver = Prg::from_key(keys.beaver);
        servers.masks = Prg::from_key(keys.masks);
        servers.rounding = Prg::from_key(keys.rounding);
        servers.replica = Some(replica);
        Ok(servers)
    }

    /// Whether this enclave drives server `role`'s untrusted side: all three in one process; its
    /// own as one of two enclaves, and server 2's as enclave 0.
    fn drives(&self, role: usize) -> bool {
        match &self.replica {
            None => true,
            Some(r) => r.role == role || (r.role == 0 && role == 2),
        }
    }

    /// Turns on the offline mode: [`Servers::prepare`] then makes server 2's products ahead of
    /// each step.
    pub fn go_offline(&mut self) {
        self.offline = Some(Offline::default());
    }

    /// Offline mode: server 2 makes the products of the schedule the last step ran (the next
    /// step runs the same one, unless the batch size changes); nothing otherwise. Its keys and
    /// products stay with server 2 and its result `Z` is stored until the op comes.
    pub fn prepare(&mut self) -> Result<(), String> {
        let Some(offline) = self.offline.as_mut() else { return Ok(()) };
        let schedule = std::mem::take(&mut offline.schedule);
        let started = Instant::now();
        for (layer, op) in schedule {
            let mut key = [0u8; 32];
            for (chunk, w) in key.chunks_exact_mut(8).zip(self.beaver.ring(4)) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            let id = self.next_triple;
            self.next_triple += 1;
            if !self.drives(2) {
                // Enclave 1: the same keys, in step with enclave 0; its Z comes from enclave 0.
                let offline = self.offline.as_mut().expect("offline");
                offline.ready.push_back(Triple { layer, op, key, id, z: None, bytes: 0 });
                offline.precomputed += 1;
                continue;
            }
            let (u, v, cmz) = expand(key, op);
            const OFFLINE: &str = "uniform randomness, independent of the data (offline)";
            let (u, v) = (self.send(2, &layer, "U", &u, OFFLINE), self.send(2, &layer, "V", &v, OFFLINE));
            let cmz = self.send(2, &layer, "CMZ", &cmz, OFFLINE);
            let z = match &mut self.links[2] {
                Side::Local => {
                    let z = server::compute(2, &op, &[u, v, cmz]);
                    if let Some(r) = &self.recorders {
                        server::record_request(&r[2], 2, &op, &[u, v, cmz], &z)?;
                    }
                    Some(z)
                }
                Side::Remote { link, name } => {
                    let mut payload = vec![id];
                    payload.extend_from_slice(&server::encode_op(&op));
                    [u, v, cmz].iter().for_each(|x| payload.extend_from_slice(x));
                    remote_call(link.as_mut(), name, 2, server::tag::PREPARE, &payload, server::tag::READY, 0)?;
                    None
                }
            };
            let bytes = op.out_len() as u64 * 8;
            let offline = self.offline.as_mut().expect("offline");
            offline.stored_bytes += bytes;
            offline.peak_stored_bytes = offline.peak_stored_bytes.max(offline.stored_bytes);
            offline.precomputed += 1;
            offline.ready.push_back(Triple { layer, op, key, id, z, bytes });
        }
        let offline = self.offline.as_mut().expect("offline");
        offline.seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// The offline product for `op`, if one is ready (triples for another schedule are dropped).
    fn take_triple(&mut self, layer: &str, op: Op) -> Option<Triple> {
        let offline = self.offline.as_mut()?;
        offline.schedule.push((layer.to_string(), op));
        while let Some(t) = offline.ready.pop_front() {
            offline.stored_bytes -= t.bytes;
            if t.op == op && t.layer == layer {
                return Some(t);
            }
        }
        offline.online += 1;
        None
    }

    /// Keeps a copy of every value sent to each untrusted side from now on.
    pub fn record_views(&mut self) {
        self.views = Some(Default::default());
    }

    /// Makes each in-process untrusted side keep its requests (operands and result) in its
    /// recorder, server 0, 1, 2 in order. A `goten-server` process is not recorded from here.
    pub fn record_sides(&mut self, recorders: [Arc<Recorder>; 3]) -> Result<(), String> {
        if self.replica.is_some() || self.links.iter().any(|l| matches!(l, Side::Remote { .. })) {
            return Err("the servers run as goten-server processes; this process records only its own servers".into());
        }
        self.recorders = Some(recorders);
        Ok(())
    }

    /// What server `role`'s untrusted side was sent while recording: `(kind, values)` in order.
    pub fn view(&self, role: usize) -> &[(String, Vec<u64>)] {
        self.views.as_ref().map_or(&[], |v| &v[role])
    }

    pub fn totals(&self) -> SideTotals {
        let mut t = SideTotals::default();
        for s in &self.sides {
            t.bytes_sent += s.bytes_in;
            t.bytes_received += s.bytes_out;
            t.requests += s.requests;
        }
        // Server 2's offline products run between steps here: device time too.
        t.seconds =
            self.sides.iter().map(|s| s.seconds).sum::<f64>() + self.offline.as_ref().map_or(0.0, |o| o.seconds);
        t
    }

    /// Where this enclave records what crosses to the untrusted sides.
    pub fn transcript(&self) -> &Arc<Transcript> {
        &self.transcript
    }

    /// Quantises `x` with the enclave's rounding stream.
    pub fn quantise(&mut self, x: &[f32], what: &str) -> Result<Quantised, String> {
        let started = Instant::now();
        let q = quant::quantise(x, &mut self.rounding, what);
        self.phase("quantise", started);
        q
    }

    fn phase(&mut self, name: &'static str, started: Instant) {
        *self.phases.entry(name).or_default() += started.elapsed().as_secs_f64();
    }

    /// Records `value` as sent to server `role`'s untrusted side (through the boundary API,
    /// which copies nothing), and hands it over.
    fn send<'v>(&mut self, role: usize, layer: &str, kind: &str, value: &'v [u64], reason: &str) -> &'v [u64] {
        let info = ReleaseInfo {
            scheme: SCHEME.into(),
            layer: layer.into(),
            kind: format!("server {role}: {kind}"),
            shape: vec![value.len()],
            reason: reason.into(),
        };
        self.sides[role].bytes_in += value.len() as u64 * 8;
        if let Some(views) = &mut self.views {
            views[role].push((kind.to_string(), value.to_vec()));
        }
        Released::new(&self.transcript, info, value).into_inner()
    }

    /// Records a result from server `role`'s untrusted side.
    fn received(&mut self, role: usize, layer: &str, kind: &str, value: &[u64]) {
        let info = ReleaseInfo {
            scheme: SCHEME.into(),
            layer: layer.into(),
            kind: format!("server {role}: {kind}"),
            shape: vec![value.len()],
            reason: "a masked partial result; checked after reconstruction".into(),
        };
        self.sides[role].bytes_out += value.len() as u64 * 8;
        self.sides[role].requests += 1;
        self.transcript.record_received_value(info, value);
    }

    /// `op(a, b)` in real values, computed on shares by the three untrusted sides; `a` and `b`
    /// are quantised already (so that a layer's backward pass reuses its forward quantisation).
    pub fn outsource(&mut self, layer: &str, op: Op, a: &Quantised, b: &Quantised) -> Result<Vec<f32>, String> {
        let result = self.outsource_once(layer, op, a, b);
        if let (Err(e), Some(replica)) = (&result, self.replica.as_mut()) {
            // The other enclave waits on this one: tell it why it stops.
            replica.fail(e);
        }
        result
    }

    fn outsource_once(&mut self, layer: &str, op: Op, a: &Quantised, b: &Quantised) -> Result<Vec<f32>, String> {
        op.check_shape().map_err(|e| format!("{layer}: {e}"))?;
        if a.values.len() != op.a_len() || b.values.len() != op.b_len() {
            return Err(format!("{layer}: operands of {} and {} values for {op:?}", a.values.len(), b.values.len()));
        }
        self.ops += 1;
        // Five products per op over the three servers; as one of two enclaves, those it drives.
        let products = [2u64, 2, 1].iter().enumerate().filter(|(r, _)| self.drives(*r)).map(|(_, p)| p).sum::<u64>();
        self.device_macs += products * op.macs();
        // The check collapses one axis of the output: about one output channel's worth.
        self.enclave_macs += op.macs() / op.check_len().max(1) as u64;
        const SHARE: &str = "a uniform additive share; alone it says nothing (non-collusion of servers 0 and 1)";
        const MASKED: &str = "the operand minus a uniform mask held by server 2 only: uniform to this server";
        const MASK: &str = "uniform randomness, independent of the data";
        let (n_a, n_b, n_c) = (op.a_len(), op.b_len(), op.out_len());
        let started = Instant::now();
        let (a0, b0) = (field::uniform(&mut self.shares, n_a), field::uniform(&mut self.shares, n_b));
        let triple = self.take_triple(layer, op);
        let (u, v, cmz) = match &triple {
            Some(t) => expand(t.key, op),
            None => {
                let (u, v) = (field::uniform(&mut self.beaver, n_a), field::uniform(&mut self.beaver, n_b));
                (u, v, field::uniform(&mut self.masks, n_c))
            }
        };
        let (a1, e) = split(&a.values, &a0, &u);
        let (b1, f) = split(&b.values, &b0, &v);
        self.phase("share", started);
        let started = Instant::now();
        let cm: [Vec<u64>; 3] = [field::uniform(&mut self.masks, n_c), field::uniform(&mut self.masks, n_c), cmz];
        self.phase("masks", started);
        // Server 0: C0 = op(A0, F) + op(E, B0 - F) - CM0.
        let c0 = if self.drives(0) {
            let (a0, b0) = (self.send(0, layer, "A0", &a0, SHARE), self.send(0, layer, "B0", &b0, SHARE));
            let (e0, f0) = (self.send(0, layer, "E", &e, MASKED), self.send(0, layer, "F", &f, MASKED));
            let cm0 = self.send(0, layer, "CM0", &cm[0], MASK);
            let c0 = self.run_side(0, op, &[a0, b0, e0, f0, cm0])?;
            self.received(0, layer, "C0", &c0);
            Some(c0)
        } else {
            None
        };

        // Server 1: C1 = op(A1, F) + op(E, B1) - CM1.
        let c1 = if self.drives(1) {
            let (a1, b1) = (self.send(1, layer, "A1", &a1, SHARE), self.send(1, layer, "B1", &b1, SHARE));
            let (e1, f1) = (self.send(1, layer, "E", &e, MASKED), self.send(1, layer, "F", &f, MASKED));
            let cm1 = self.send(1, layer, "CM1", &cm[1], MASK);
            let c1 = self.run_side(1, op, &[a1, b1, e1, f1, cm1])?;
            self.received(1, layer, "C1", &c1);
            Some(c1)
        } else {
            None
        };

        // Server 2: Z = op(U, V) - CMZ, now or (offline mode) made ahead of time.
        let z = match triple {
            _ if !self.drives(2) => None,
            Some(Triple { z: Some(z), .. }) => Some(z),
            Some(Triple { id, .. }) => {
                let started = Instant::now();
                let Side::Remote { link, name } = &mut self.links[2] else { unreachable!("a local Z is kept") };
                let z = remote_call(link.as_mut(), name, 2, server::tag::TAKE, &[id], server::tag::RESULT, n_c)?;
                self.sides[2].seconds += started.elapsed().as_secs_f64();
                Some(z)
            }
            None => {
                let (u, v) = (self.send(2, layer, "U", &u, MASK), self.send(2, layer, "V", &v, MASK));
                let cmz = self.send(2, layer, "CMZ", &cm[2], MASK);
                Some(self.run_side(2, op, &[u, v, cmz])?)
            }
        };
        if let Some(z) = &z {
            self.received(2, layer, "Z", z);
        }
        // The streams' first words: enclaves whose streams parted (other settings) differ here.
        let streams = [&u, &v, &cm[0], &cm[1], &cm[2]].map(|s| s.first().copied().unwrap_or(0));
        let [c0, c1, z] = self.swap(layer, op, a, b, &streams, [c0, c1, z])?;

        let started = Instant::now();
        let c = field::sum6([&c0, &c1, &z, &cm[0], &cm[1], &cm[2]]);
        self.phase("reconstruct", started);
        let started = Instant::now();
        let c = self.checked(layer, op, a, b, c)?;
        self.phase("check", started);
        let started = Instant::now();
        let scale = quant::product_scale(a.exp, b.exp);
        let out = {
            use rayon::prelude::*;
            c.par_iter().map(|&w| (w as i64 as f64 * scale) as f32).collect()
        };
        self.phase("dequantise", started);
        Ok(out)
    }

    /// The three partial results: those this enclave drove, and (as one of two enclaves) those
    /// the other enclave hands over, recorded as received by this server's host.
    fn swap(
        &mut self,
        layer: &str,
        op: Op,
        a: &Quantised,
        b: &Quantised,
        streams: &[u64],
        partials: [Option<Vec<u64>>; 3],
    ) -> Result<[Vec<u64>; 3], String> {
        let [c0, c1, z] = partials;
        let Some(replica) = self.replica.as_mut() else {
            let all = (c0, c1, z);
            let (Some(c0), Some(c1), Some(z)) = all else { unreachable!("one enclave drives all three servers") };
            return Ok([c0, c1, z]);
        };
        let started = Instant::now();
        let digest = operands_digest(layer, &server::encode_op(&op), streams, a, b);
        let role = replica.role;
        let (c0, c1, z) = if role == 0 {
            let (c0, z) = (c0.expect("enclave 0 drives server 0"), z.expect("and server 2"));
            let swapped = replica.swap(layer, digest, &c0, Some(&z))?;
            (c0, swapped.other, z)
        } else {
            let c1 = c1.expect("enclave 1 drives server 1");
            let swapped = replica.swap(layer, digest, &c1, None)?;
            (swapped.other, c1, swapped.z.expect("enclave 0 hands on Z"))
        };
        // Waiting on the other enclave (and, for enclave 1, on server 2) is not this enclave's work.
        self.sides[1 - role].seconds += started.elapsed().as_secs_f64();
        let reason = "the other server's partial result, masked by output masks this host never holds";
        let info = |kind: String, len: usize| ReleaseInfo {
            scheme: SCHEME.into(),
            layer: layer.into(),
            kind,
            shape: vec![len],
            reason: reason.into(),
        };
        if role == 0 {
            self.transcript.record_received_value(info("server 0: C1 (from enclave 1)".into(), c1.len()), &c1);
        } else {
            self.transcript.record_received_value(info("server 1: C0 (from enclave 0)".into(), c0.len()), &c0);
            self.transcript.record_received_value(info("server 1: Z (from enclave 0)".into(), z.len()), &z);
        }
        Ok([c0, c1, z])
    }

    /// Server `role`'s result for `op` on `operands`, computed here or on its process.
    fn run_side(&mut self, role: usize, op: Op, operands: &[&[u64]]) -> Result<Vec<u64>, String> {
        let started = Instant::now();
        let out = match &mut self.links[role] {
            Side::Local => {
                let out = server::compute(role, &op, operands);
                if let Some(r) = &self.recorders {
                    server::record_request(&r[role], role, &op, operands, &out)?;
                }
                out
            }
            Side::Remote { link, name } => {
                let mut payload = server::encode_op(&op).to_vec();
                operands.iter().for_each(|x| payload.extend_from_slice(x));
                remote_call(
                    link.as_mut(),
                    name,
                    role,
                    server::tag::COMPUTE,
                    &payload,
                    server::tag::RESULT,
                    op.out_len(),
                )?
            }
        };
        self.sides[role].seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }

    /// `c` if it is the exact product; the exact product recomputed here if `c` wrapped around
    /// the field; an error if a device returned a wrong value (module docs of [`crate::ops`]).
    fn checked(&mut self, layer: &str, op: Op, a: &Quantised, b: &Quantised, c: Vec<u64>) -> Result<Vec<u64>, String> {
        let s = self.checks.ring(op.check_len());
        if op.check(&a.values, &b.values, &c, &s) {
            return Ok(c);
        }
        let wrong = || format!("{layer}: the servers' result for {op:?} is wrong (a device returned a corrupt value)");
        if op.never_wraps() {
            return Err(wrong());
        }
        let exact = op.eval(&a.values, &b.values);
        self.enclave_macs += op.macs();
        if exact.iter().zip(&c).any(|(&x, &y)| field::reduce(x) != y) {
            return Err(wrong());
        }
        self.recomputed += 1;
        Ok(exact)
    }
}

/// Sends one request to a remote server and takes its answer of exactly `words` words (or the
/// reason it failed).
fn remote_call(
    link: &mut dyn Channel,
    name: &str,
    role: usize,
    tag: u16,
    payload: &[u64],
    answer: u16,
    words: usize,
) -> Result<Vec<u64>, String> {
    let failed = |e: ChannelError| format!("goten server {role} at {name}: {e}");
    link.send(tag, &server::to_bytes(payload)).map_err(failed)?;
    let frame = link.recv_limited((words * 8).max(1 << 16)).map_err(failed)?;
    if frame.tag == server::tag::FAILED {
        return Err(format!(
            "goten server {role} at {name} failed: {}",
            trustsplit_boundary::printable(&frame.payload)
        ));
    }
    if frame.tag != answer || frame.payload.len() != words * 8 {
        return Err(format!(
            "goten server {role} at {name} answered tag {:#06x} with {} bytes, expected {answer:#06x} with {}",
            frame.tag,
            frame.payload.len(),
            words * 8
        ));
    }
    Ok(frame.payload.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

impl Drop for Servers {
    fn drop(&mut self) {
        for side in &mut self.links {
            if let Side::Remote { link, .. } = side {
                let _ = link.send(server::tag::STOP, &[]);
            }
        }
    }
}

/// `U, V, CMZ` of an offline product, from its key.
fn expand(key: [u8; 32], op: Op) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let mut prg = Prg::from_key(key);
    let u = field::uniform(&mut prg, op.a_len());
    let v = field::uniform(&mut prg, op.b_len());
    let cmz = field::uniform(&mut prg, op.out_len());
    (u, v, cmz)
}

/// `(x - s, x - m)` in one parallel pass: the second share and the masked operand.
fn split(x: &[u64], s: &[u64], m: &[u64]) -> (Vec<u64>, Vec<u64>) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let (mut share, mut masked) = (vec![0u64; x.len()], vec![0u64; x.len()]);
    share.par_chunks_mut(CHUNK).zip(masked.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (sh, ma))| {
        let at = c * CHUNK;
        for i in 0..sh.len() {
            sh[i] = field::sub_one(x[at + i], s[at + i]);
            ma[i] = field::sub_one(x[at + i], m[at + i]);
        }
    });
    (share, masked)
}
