//! The three parties as separate processes (or machines), and the data owner's links to them:
//! TCP, mutually authenticated and encrypted ([`Link`]: Noise XX with every key pinned).
//!
//! Links. Each party listens on one address. Party `i` dials party `j` for what `i` sends to `j`,
//! so every pair of parties has two connections, one per direction, and the data owner dials each
//! party once. A connection proves its key in the handshake (the listener accepts only the keys
//! of its two neighbours and of the owner), then names its purpose in a first message
//! (`cryptgpu party 0 to 1`, `cryptgpu owner`), which must be the one that key may ask for; the
//! handshake's own purpose is the listening party (`cryptgpu to party 1`), because the listener
//! has to choose it before it knows who is connecting. Anything else is refused with the reason.
//!
//! Why one connection per direction: the protocols often have every party send to its next
//! neighbour and then receive from its previous one. Over TCP a large send blocks until the peer
//! reads, so three blocking sends around the ring would wait on each other forever. A
//! [`PeerLink`] hands what it sends to a writer thread of its own, through a queue, and reads the
//! other direction itself: a send never waits for the peer.
//!
//! Failures. A party whose link fails (to a neighbour or to the owner) tells its neighbours why
//! before it closes ([`PeerLink`] sends the first failure its links saw), so that a party killed
//! mid-run is named by the parties that learn of it second-hand, and by the owner they report to.
//!
//! Setup. Anyone may connect to a party's listener, so what a connection costs before it has
//! proved a key is bounded: at most [`MAX_HANDSHAKES`] handshakes run at once, and a further
//! connection drops the oldest unfinished one (idle connections cannot lock the real peers out,
//! and a peer's handshake takes milliseconds). Linking with the two neighbours, the pairwise keys
//! included, must finish within the party's wait (`--wait-s`), or the party stops and names the
//! neighbours that never linked. A neighbour whose link to this party closes before the links are
//! taken into use (it was restarted) may link again; one restarted later, after this party's own
//! link to it was made, is not dialed again: restart this party too (the restarted one names it
//! when its wait runs out). The data owner may come any time after the parties have linked.

use crate::party::{MpcError, Party};
use crate::ring::{FixedPoint, DEFAULT_FRAC_BITS};
use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use trustsplit_boundary::{
    printable, Channel, ChannelError, ChannelOptions, Frame, KeyPair, Link, LinkPolicy, PublicKey,
};

/// How long a party or the owner waits for the next message. Long: a party may compute for
/// minutes between two messages on a large model (a VGG16 layer's products on shares), and the
/// owner waits for a whole step's logits.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest message: a VGG16 batch of shares (two ring elements per value) fits.
pub const MAX_FRAME_BYTES: usize = 1 << 31;
/// The purpose the data owner's link names.
pub const OWNER_PURPOSE: &str = "cryptgpu owner";
/// How long a closing link waits for its queued messages to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(30);
/// How often a party tries again to reach a neighbour that is not listening yet.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// The longest purpose, answer or failure note read.
const MAX_NOTE_BYTES: usize = 4096;
/// The most connections a party's listener takes through their handshakes at once: each holds a
/// thread for up to the 30 s handshake limit before it has proved any key.
pub const MAX_HANDSHAKES: usize = 16;
/// The most refusals kept for the error that may be their consequence (a flood is only counted).
const MAX_REFUSALS_KEPT: usize = 8;
/// How long, past the deadline, this party's dialers get to say why they failed.
const DIAL_GRACE: Duration = Duration::from_secs(1);
/// The least time the key exchange gets: neighbours that linked just before the deadline are
/// ready, and each sends its key at once.
const KEY_GRACE: Duration = Duration::from_secs(10);

/// Messages of the links themselves (the protocols' tags are `0x47xx`).
pub mod tag {
    /// The connecting side's purpose.
    pub const HELLO: u16 = 0x4a01;
    /// The purpose is accepted (for the owner: the party is ready).
    pub const WELCOME: u16 = 0x4a02;
    /// The purpose is refused; the payload says why.
    pub const REFUSED: u16 = 0x4a03;
    /// The sender stops because one of its links failed; the payload is that failure.
    pub const ABORT: u16 = 0x4a04;
}

/// The limits of every link here.
pub fn link_options() -> ChannelOptions {
    ChannelOptions { max_frame_bytes: MAX_FRAME_BYTES, timeout: Some(LINK_TIMEOUT) }
}

/// The purpose party `from`'s link to party `to` names.
pub fn party_purpose(from: usize, to: usize) -> String {
    format!("cryptgpu party {from} to {to}")
}

/// The purpose of every handshake with party `to`'s listener.
pub fn purpose_to(to: usize) -> String {
    format!("cryptgpu to party {to}")
}

/// Where the three parties listen and who they are: the same lists on every party and on the
/// owner (`--peers`, `--party-keys`).
#[derive(Clone, Debug, PartialEq)]
pub struct Parties {
    pub addrs: Vec<String>,
    pub keys: Vec<PublicKey>,
}

impl Parties {
    pub fn new(addrs: Vec<String>, keys: Vec<PublicKey>) -> Result<Parties, MpcError> {
        if addrs.len() != 3 || addrs.iter().any(|a| a.trim().is_empty()) {
            return Err(MpcError::Invalid(format!(
                "--peers lists {} address(es); give the three parties' HOST:PORT, party 0, 1, 2 in order",
                addrs.len()
            )));
        }
        if keys.len() != 3 {
            return Err(MpcError::Invalid(format!(
                "--party-keys lists {} key(s); give the three parties' public keys (trustsplit keygen), party 0, 1, 2 \
                 in order",
                keys.len()
            )));
        }
        if keys[0] == keys[1] || keys[1] == keys[2] || keys[0] == keys[2] {
            return Err(MpcError::Invalid("--party-keys names one key twice; each party needs its own".into()));
        }
        Ok(Parties { addrs: addrs.into_iter().map(|a| a.trim().to_string()).collect(), keys })
    }

    /// Party `i` as errors name it.
    pub fn name(&self, i: usize) -> String {
        format!("party {i} ({})", self.addrs[i])
    }
}

/// One party's settings (`trustsplit party`).
#[derive(Clone, Debug)]
pub struct PartyConfig {
    pub id: usize,
    pub parties: Parties,
    /// The only data owner whose run this party serves.
    pub owner_key: PublicKey,
    /// How long to wait for the other two parties to come up and link.
    pub wait: Duration,
    /// The folder of this party's uploads ([`crate::store`]); `None`: it takes none.
    pub store: Option<std::path::PathBuf>,
}

/// Who a connection is, by the key it proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Party(usize),
    Owner,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Party(i) => write!(f, "party {i}"),
            Role::Owner => f.write_str("the data owner"),
        }
    }
}

/// What the listener thread, the dialers and the key exchange report to the party.
enum Arrival {
    /// A connection proved a key and asked for what that key may ask for.
    Linked(Inbound),
    Refused(String),
    /// This party's own link to a neighbour, or why it could not be made.
    Dialed(usize, Result<Box<Link>, String>),
    /// The party, once the pairwise keys are exchanged.
    Keyed(Box<Result<Party, MpcError>>),
}

/// A link a neighbour or the owner opened, not yet taken into use.
struct Inbound {
    role: Role,
    link: Box<Link>,
    from: SocketAddr,
    /// The same socket, to see whether the peer has gone before the link is taken into use.
    probe: Option<TcpStream>,
}

impl Inbound {
    /// Whether the peer closed its end (or the socket failed). Nothing reads the socket while
    /// the link waits here, so making it non-blocking for one peek cannot disturb the link.
    fn closed(&self) -> bool {
        let Some(probe) = &self.probe else { return false };
        if probe.set_nonblocking(true).is_err() {
            return true;
        }
        let closed = match probe.peek(&mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        // A socket left non-blocking would turn the link's waits into timeouts.
        probe.set_nonblocking(false).is_err() || closed
    }
}

/// The connections in their handshakes, oldest first, each with a handle on its socket (to drop
/// it) and whether it was dropped.
#[derive(Default)]
struct Handshakes {
    next_id: u64,
    pending: VecDeque<(u64, TcpStream, Arc<AtomicBool>)>,
}

/// Counts `stream` among the handshakes, dropping the oldest when [`MAX_HANDSHAKES`] run already.
/// `None`: its socket cannot be watched (it is not taken).
fn enter(handshakes: &Mutex<Handshakes>, stream: &TcpStream) -> Option<(u64, Arc<AtomicBool>)> {
    let handle = stream.try_clone().ok()?;
    let dropped = Arc::new(AtomicBool::new(false));
    let mut h = lock(handshakes);
    if h.pending.len() >= MAX_HANDSHAKES {
        if let Some((_, oldest, flag)) = h.pending.pop_front() {
            flag.store(true, Ordering::SeqCst);
            let _ = oldest.shutdown(Shutdown::Both);
        }
    }
    let id = h.next_id;
    h.next_id += 1;
    h.pending.push_back((id, handle, dropped.clone()));
    Some((id, dropped))
}

/// Ends handshake `id`'s count; whether it had been dropped.
fn leave(handshakes: &Mutex<Handshakes>, id: u64, dropped: &AtomicBool) -> bool {
    lock(handshakes).pending.retain(|(i, _, _)| *i != id);
    dropped.load(Ordering::SeqCst)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `e` with its peer named `name` (a party and its listening address, rather than whichever
/// ephemeral port its connection came from).
fn renamed(e: ChannelError, name: &str) -> ChannelError {
    use ChannelError::*;
    let peer = name.to_string();
    match e {
        BadMagic { found, .. } => BadMagic { peer, found },
        Version { found, .. } => Version { peer, found },
        TooLarge { len, max, .. } => TooLarge { peer, len, max },
        UnexpectedTag { expected, found, .. } => UnexpectedTag { peer, expected, found },
        Closed { context, .. } => Closed { peer, context },
        Timeout { after, .. } => Timeout { peer, after },
        Deadline { after, context, .. } => Deadline { peer, after, context },
        Broken { cause, .. } => Broken { peer, cause },
        Handshake { reason, .. } => Handshake { peer, reason },
        Refused { reason, .. } => Refused { peer, reason },
        Io { source, .. } => Io { peer, source },
        Malformed { reason, .. } => Malformed { peer, reason },
        Authentication { .. } => Authentication { peer },
    }
}

/// Names its purpose on a freshly connected link and waits for the answer.
fn introduce(link: &mut Link, purpose: &str) -> Result<(), NotTaken> {
    link.send(tag::HELLO, purpose.as_bytes()).map_err(NotTaken::Link)?;
    let answer = link.recv_limited(MAX_NOTE_BYTES).map_err(NotTaken::Link)?;
    match answer.tag {
        tag::WELCOME => Ok(()),
        tag::REFUSED => Err(NotTaken::Answer(format!("it refused the link: {}", printable(&answer.payload)))),
        other => Err(NotTaken::Answer(format!("it answered with message tag {other:#x} instead of a welcome"))),
    }
}

/// Why a link was not taken: it failed (worth trying again while the peer may be restarting, or
/// busy), or the peer said no.
enum NotTaken {
    Link(ChannelError),
    Answer(String),
}

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTaken::Link(e) => write!(f, "{e}"),
            NotTaken::Answer(a) => f.write_str(a),
        }
    }
}

/// A link to a neighbouring party: what this party sends goes out on the connection it dialed,
/// through a writer thread (a send returns at once); what it receives comes in on the
/// connection the neighbour dialed. A failure of the writer is reported by the next send or
/// receive.
pub struct PeerLink {
    name: String,
    queue: Option<mpsc::Sender<Frame>>,
    /// Disconnects when the writer thread ends.
    written: Option<mpsc::Receiver<()>>,
    writer_failure: Arc<Mutex<Option<ChannelError>>>,
    inbound: Link,
    /// The failure this link reported, repeated by every later call.
    failed: Option<String>,
    /// The first failure any of this party's links saw (shared by its two links).
    cause: Arc<Mutex<Option<String>>>,
}

impl PeerLink {
    fn new(
        name: String,
        mut outbound: Link,
        inbound: Link,
        cause: Arc<Mutex<Option<String>>>,
    ) -> std::io::Result<PeerLink> {
        let (queue, frames) = mpsc::channel::<Frame>();
        let (done, written) = mpsc::channel::<()>();
        let writer_failure = Arc::new(Mutex::new(None));
        let (failure, writer_name) = (writer_failure.clone(), name.clone());
        std::thread::Builder::new().name(format!("cryptgpu link to {name}")).spawn(move || {
            let _done = done;
            for frame in frames {
                if let Err(e) = outbound.send(frame.tag, &frame.payload) {
                    *lock(&failure) = Some(renamed(e, &writer_name));
                    return;
                }
            }
        })?;
        Ok(PeerLink { name, queue: Some(queue), written: Some(written), writer_failure, inbound, failed: None, cause })
    }

    fn fail(&mut self, e: ChannelError) -> ChannelError {
        let text = e.to_string();
        self.failed.get_or_insert_with(|| text.clone());
        lock(&self.cause).get_or_insert(text);
        e
    }

    fn aborted(&self, note: &[u8]) -> ChannelError {
        ChannelError::Closed {
            peer: self.name.clone(),
            context: format!("because a link of its own failed ({})", printable(note)),
        }
    }

    /// Refuses a call after an earlier failure of this link or of its writer.
    fn check(&mut self) -> Result<(), ChannelError> {
        if let Some(cause) = &self.failed {
            return Err(ChannelError::Broken { peer: self.name.clone(), cause: cause.clone() });
        }
        let pending = lock(&self.writer_failure).take();
        match pending {
            Some(e) => Err(self.writer_failed(e)),
            None => Ok(()),
        }
    }

    /// Reports the writer's failure, or, when the neighbour closed after failing itself, the
    /// reason it sent last: that names the party that really failed.
    fn writer_failed(&mut self, e: ChannelError) -> ChannelError {
        let peer_closed = !matches!(e, ChannelError::Timeout { .. } | ChannelError::Deadline { .. });
        let e = match peer_closed.then(|| self.inbound.recv_limited(MAX_NOTE_BYTES)) {
            Some(Ok(f)) if f.tag == tag::ABORT => self.aborted(&f.payload),
            _ => e,
        };
        self.fail(e)
    }
}

impl Channel for PeerLink {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.check()?;
        if payload.len() > MAX_FRAME_BYTES {
            return Err(ChannelError::TooLarge { peer: self.name.clone(), len: payload.len(), max: MAX_FRAME_BYTES });
        }
        let queued = self.queue.as_ref().is_some_and(|q| q.send(Frame { tag, payload: payload.to_vec() }).is_ok());
        if !queued {
            // The writer ended: it failed (and said how) between the check and the send.
            let e = lock(&self.writer_failure).take().unwrap_or_else(|| ChannelError::Closed {
                peer: self.name.clone(),
                context: "while sending (the link's writer stopped)".into(),
            });
            return Err(self.writer_failed(e));
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.recv_limited(usize::MAX)
    }

    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        self.check()?;
        // A neighbour's failure note may be longer than the message expected here.
        let frame = match self.inbound.recv_limited(max_payload.max(MAX_NOTE_BYTES)) {
            Ok(f) => f,
            Err(e) => {
                let e = renamed(e, &self.name);
                return Err(self.fail(e));
            }
        };
        if frame.tag == tag::ABORT {
            let e = self.aborted(&frame.payload);
            return Err(self.fail(e));
        }
        if frame.payload.len() > max_payload {
            let e = ChannelError::TooLarge { peer: self.name.clone(), len: frame.payload.len(), max: max_payload };
            return Err(self.fail(e));
        }
        Ok(frame)
    }

    fn peer(&self) -> String {
        self.name.clone()
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        // A neighbour that waits on this party would otherwise see only a closed connection and
        // blame this party for a failure it merely passed on.
        let cause = lock(&self.cause).clone();
        if let (Some(queue), Some(cause)) = (&self.queue, cause) {
            let mut note = cause.into_bytes();
            note.truncate(MAX_NOTE_BYTES);
            let _ = queue.send(Frame { tag: tag::ABORT, payload: note });
        }
        self.queue = None;
        if let Some(written) = self.written.take() {
            // Disconnected once the writer has sent everything queued (or given up).
            let _ = written.recv_timeout(FLUSH_LIMIT);
        }
    }
}

/// A link whose errors name the party (or owner) at its end.
struct Named {
    link: Link,
    name: String,
    /// A party's first failure, which its neighbours are told (on a party's link to the owner).
    cause: Option<Arc<Mutex<Option<String>>>>,
}

impl Named {
    fn failed(&self, e: ChannelError) -> ChannelError {
        let e = renamed(e, &self.name);
        if let Some(cause) = &self.cause {
            lock(cause).get_or_insert_with(|| e.to_string());
        }
        e
    }
}

impl Channel for Named {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.link.send(tag, payload).map_err(|e| self.failed(e))
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.link.recv().map_err(|e| self.failed(e))
    }
    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        self.link.recv_limited(max_payload).map_err(|e| self.failed(e))
    }
    fn peer(&self) -> String {
        self.name.clone()
    }
}

/// One party's listener and the links it has gathered.
pub struct PartyNode {
    config: PartyConfig,
    key: Arc<KeyPair>,
    addr: SocketAddr,
    arrivals: mpsc::Receiver<Arrival>,
    /// For the dialers and the key exchange; dropped once the parties have linked.
    report: Option<mpsc::Sender<Arrival>>,
    /// Tells the listener thread to stop accepting.
    stop: Arc<AtomicBool>,
    /// The roles whose links are taken into use (the owner's: accepted), which the listener
    /// refuses from then on.
    taken: Arc<Mutex<Vec<Role>>>,
    /// Links that came in before they were waited for.
    arrived: Vec<Inbound>,
    /// Connections refused so far (the first few), for the error when a party never links.
    refusals: Vec<String>,
    /// How many more were refused.
    refusals_more: usize,
    /// The first failure of any of this party's links, the owner's included.
    cause: Arc<Mutex<Option<String>>>,
}

impl PartyNode {
    /// Starts accepting on `listener` (the address the other parties and the owner dial).
    pub fn start(listener: TcpListener, key: Arc<KeyPair>, config: PartyConfig) -> Result<PartyNode, MpcError> {
        let id = config.id;
        let setup = |reason: String| MpcError::Setup { party: id, reason };
        if id > 2 {
            return Err(MpcError::Invalid(format!("party ids are 0, 1 and 2, not {id}")));
        }
        if config.parties.keys[id] != key.public() {
            return Err(setup(format!(
                "this key's public key is {}, but --party-keys says party {id}'s is {}",
                key.public(),
                config.parties.keys[id]
            )));
        }
        if config.parties.keys.contains(&config.owner_key) {
            return Err(setup("--owner-key is one of --party-keys; the data owner needs a key of its own".into()));
        }
        let addr = listener.local_addr().map_err(|e| setup(format!("the listener: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| setup(format!("the listener: {e}")))?;
        let (tx, arrivals) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let (k, c, s, t, report) = (key.clone(), config.clone(), stop.clone(), taken.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("cryptgpu party {id} listener"))
            .spawn(move || listen(listener, k, c, report, s, t))
            .map_err(|e| setup(format!("cannot start the listener: {e}")))?;
        let cause = Arc::new(Mutex::new(None));
        Ok(PartyNode {
            config,
            key,
            addr,
            arrivals,
            report: Some(tx),
            stop,
            taken,
            arrived: Vec::new(),
            refusals: Vec::new(),
            refusals_more: 0,
            cause,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn setup_error(&self, reason: String) -> MpcError {
        MpcError::Setup { party: self.config.id, reason }
    }

    /// Takes in what the listener reported; refusals are told to `log`.
    fn note(&mut self, arrival: Arrival, log: &mut dyn FnMut(&str)) {
        match arrival {
            Arrival::Linked(inbound) => self.arrive(inbound, log),
            Arrival::Refused(reason) => {
                log(&reason);
                match self.refusals.len() < MAX_REFUSALS_KEPT {
                    true => self.refusals.push(reason),
                    false => self.refusals_more += 1,
                }
            }
            // Only `link_parties` starts dialers and key exchanges, and it takes their reports.
            Arrival::Dialed(..) | Arrival::Keyed(_) => {}
        }
    }

    /// Keeps a link until it is waited for. A second link of one role replaces the first only
    /// if the first has closed: a neighbour restarted during the setup may link again, while a
    /// second process with the same key does not take a live link over.
    fn arrive(&mut self, new: Inbound, log: &mut dyn FnMut(&str)) {
        let (me, role, from) = (self.config.id, new.role, new.from);
        if role != Role::Owner && lock(&self.taken).contains(&role) {
            // Its first link was taken into use while this one was in its handshake.
            log(&format!("party {me}: closed a second link from {role} ({from}): its first is in use"));
            return;
        }
        match self.arrived.iter().position(|a| a.role == role) {
            None => self.arrived.push(new),
            Some(at) if self.arrived[at].closed() => {
                log(&format!("party {me}: {role} linked again from {from}; its earlier link had closed"));
                self.arrived[at] = new;
            }
            Some(_) => log(&format!("party {me}: closed a second link from {role} ({from}): its first is still open")),
        }
    }

    /// The link `role` opened, if it has come; taken into use (the listener refuses it from now).
    fn take_arrived(&mut self, role: Role) -> Option<Inbound> {
        let at = self.arrived.iter().position(|a| a.role == role)?;
        let mut taken = lock(&self.taken);
        if !taken.contains(&role) {
            taken.push(role);
        }
        Some(self.arrived.swap_remove(at))
    }

    /// The connections refused so far, for an error that may be their consequence.
    fn refused_meanwhile(&self) -> String {
        let more = match self.refusals_more {
            0 => String::new(),
            n => format!("; and {n} more"),
        };
        match self.refusals.is_empty() {
            true => String::new(),
            false => format!(" (refused meanwhile: {}{more})", self.refusals.join("; ")),
        }
    }

    /// The link `role` opened, waiting for it as long as the listener runs.
    fn wait_for(&mut self, role: Role, log: &mut dyn FnMut(&str)) -> Result<(Link, SocketAddr), MpcError> {
        loop {
            if let Some(inbound) = self.take_arrived(role) {
                return Ok((*inbound.link, inbound.from));
            }
            match self.arrivals.recv() {
                Ok(a) => self.note(a, log),
                Err(_) => return Err(self.setup_error(format!("stopped listening before {role} linked"))),
            }
        }
    }

    /// Why the neighbours' links are not all there: each neighbour that never linked, either way,
    /// and what the dialers said.
    fn not_linked(&self, outbound: &[Option<Box<Link>>; 3], failures: &[String], timed_out: bool) -> MpcError {
        let id = self.config.id;
        let mut missing = Vec::new();
        for r in [(id + 1) % 3, (id + 2) % 3] {
            let name = self.config.parties.name(r);
            let inbound = self.arrived.iter().any(|a| a.role == Role::Party(r));
            match (outbound[r].is_some(), inbound) {
                (false, false) => missing.push(format!("{name} never linked")),
                (true, false) => {
                    missing.push(format!("{name} never linked to this party (this party's link to it is up)"))
                }
                (false, true) => {
                    missing.push(format!("this party's link to {name} never completed (its link here is up)"))
                }
                (true, true) => {}
            }
        }
        let within = match timed_out {
            true => format!(" within {} s", self.config.wait.as_secs()),
            false => String::new(),
        };
        let failures = match failures.is_empty() {
            true => String::new(),
            false => format!(" ({})", failures.join("; ")),
        };
        self.setup_error(format!(
            "the other parties did not link{within}: {}{failures}; are they running, with the same --peers and \
             --party-keys?{}",
            missing.join("; "),
            self.refused_meanwhile()
        ))
    }

    /// Links with the other two parties and exchanges the pairwise keys: this party, ready for
    /// the owner. All of it within the configured wait (the key exchange gets at least
    /// [`KEY_GRACE`]), whatever the neighbours do.
    pub fn link_parties(&mut self, log: &mut dyn FnMut(&str)) -> Result<Party, MpcError> {
        let id = self.config.id;
        let (next, prev) = ((id + 1) % 3, (id + 2) % 3);
        let deadline = Instant::now() + self.config.wait;
        let report = self.report.take().ok_or_else(|| self.setup_error("the parties are linked already".into()))?;
        // The dials run on threads of their own: a neighbour that accepts the connection and
        // then says nothing holds up a dialer, not the deadline.
        for to in [next, prev] {
            let (key, addr, their_key, report) =
                (self.key.clone(), self.config.parties.addrs[to].clone(), self.config.parties.keys[to], report.clone());
            std::thread::Builder::new()
                .name(format!("cryptgpu party {id} dialing {to}"))
                .spawn(move || {
                    let linked = dial(id, to, &addr, &key, their_key, deadline);
                    let _ = report.send(Arrival::Dialed(to, linked.map(Box::new)));
                })
                .map_err(|e| self.setup_error(format!("cannot start dialing party {to}: {e}")))?;
        }
        let mut outbound: [Option<Box<Link>>; 3] = [None, None, None];
        let mut failures = Vec::new();
        let (from_next, from_prev) = loop {
            let have = |r| self.arrived.iter().any(|a| a.role == Role::Party(r));
            if outbound[next].is_some() && outbound[prev].is_some() && have(next) && have(prev) {
                // Taken into use only while open: a neighbour that dropped may still link again.
                let gone: Vec<usize> = [next, prev]
                    .into_iter()
                    .filter(|&r| self.arrived.iter().any(|a| a.role == Role::Party(r) && a.closed()))
                    .collect();
                if gone.is_empty() {
                    let from_next = self.take_arrived(Role::Party(next)).expect("checked above");
                    let from_prev = self.take_arrived(Role::Party(prev)).expect("checked above");
                    break (from_next, from_prev);
                }
                for r in gone {
                    log(&format!(
                        "party {id}: party {r}'s link closed before the setup completed; waiting for it again"
                    ));
                    self.arrived.retain(|a| a.role != Role::Party(r));
                }
            }
            if !failures.is_empty() {
                self.drain(log);
                return Err(self.not_linked(&outbound, &failures, false));
            }
            match self.arrivals.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Arrival::Dialed(to, Ok(link))) => outbound[to] = Some(link),
                Ok(Arrival::Dialed(_, Err(e))) => failures.push(e),
                Ok(a) => self.note(a, log),
                Err(_) => {
                    // The dialers stop retrying at the deadline too; their last errors say why.
                    let waiting = [next, prev].iter().filter(|&&r| outbound[r].is_none()).count();
                    let grace = Instant::now() + DIAL_GRACE;
                    while failures.len() < waiting {
                        match self.arrivals.recv_timeout(grace.saturating_duration_since(Instant::now())) {
                            Ok(Arrival::Dialed(to, Ok(link))) => outbound[to] = Some(link),
                            Ok(Arrival::Dialed(_, Err(e))) => failures.push(e),
                            Ok(a) => self.note(a, log),
                            Err(_) => break,
                        }
                    }
                    return Err(self.not_linked(&outbound, &failures, true));
                }
            }
        };
        let names = (self.config.parties.name(next), self.config.parties.name(prev));
        let (to_next, to_prev) = (outbound[next].take().expect("linked"), outbound[prev].take().expect("linked"));
        let writer = |e: std::io::Error| self.setup_error(format!("cannot start a link's writer: {e}"));
        let next_link = PeerLink::new(names.0, *to_next, *from_next.link, self.cause.clone()).map_err(writer)?;
        let prev_link =
            PeerLink::new(names.1.clone(), *to_prev, *from_prev.link, self.cause.clone()).map_err(writer)?;
        // The owner's setup brings the run's fixed-point format.
        let fp = FixedPoint::new(DEFAULT_FRAC_BITS).map_err(MpcError::Invalid)?;
        std::thread::Builder::new()
            .name(format!("cryptgpu party {id} keys"))
            .spawn(move || {
                let party = Party::connect(id, Box::new(next_link), Box::new(prev_link), fp);
                let _ = report.send(Arrival::Keyed(Box::new(party)));
            })
            .map_err(|e| self.setup_error(format!("cannot start the key exchange: {e}")))?;
        let keys_by = deadline.max(Instant::now() + KEY_GRACE);
        loop {
            match self.arrivals.recv_timeout(keys_by.saturating_duration_since(Instant::now())) {
                Ok(Arrival::Keyed(party)) => return *party,
                Ok(a) => self.note(a, log),
                Err(_) => {
                    return Err(self.setup_error(format!(
                        "linked with parties {next} and {prev}, but {} did not send its key in time",
                        names.1
                    )))
                }
            }
        }
    }

    /// Takes in what has come so far (for an error that may be its consequence).
    fn drain(&mut self, log: &mut dyn FnMut(&str)) {
        while let Ok(a) = self.arrivals.try_recv() {
            self.note(a, log);
        }
    }

    /// Waits (for ever) for the data owner's link, and tells the owner this party is ready.
    pub fn accept_owner(&mut self, log: &mut dyn FnMut(&str)) -> Result<Box<dyn Channel>, MpcError> {
        let id = self.config.id;
        let (link, from) = loop {
            let (mut link, from) = self.wait_for(Role::Owner, log)?;
            match link.send(tag::WELCOME, &[]) {
                Ok(()) => break (link, from),
                Err(e) => {
                    // Nothing has begun: the owner may connect again.
                    log(&format!(
                        "party {id}: the data owner at {from} left before the run began ({e}); waiting again"
                    ));
                    lock(&self.taken).retain(|r| *r != Role::Owner);
                }
            }
        };
        self.stop.store(true, Ordering::SeqCst);
        // A party that loses its owner tells its neighbours so, rather than leave them to blame it.
        Ok(Box::new(Named { link, name: format!("the data owner ({from})"), cause: Some(self.cause.clone()) }))
    }
}

impl Drop for PartyNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Dials party `to` (trying again while it is not listening yet, or dropped the connection
/// unfinished, until `deadline`), proves who this party is and checks who answers.
fn dial(
    id: usize,
    to: usize,
    addr: &str,
    key: &KeyPair,
    their_key: PublicKey,
    deadline: Instant,
) -> Result<Link, String> {
    let pinned = LinkPolicy::Only(vec![their_key]);
    let again = |e: &ChannelError| {
        matches!(e, ChannelError::Io { .. } | ChannelError::Closed { .. }) && Instant::now() < deadline
    };
    loop {
        match Link::connect(addr, &purpose_to(to), key, &pinned, link_options()) {
            Ok(mut link) => match introduce(&mut link, &party_purpose(id, to)) {
                Ok(()) => return Ok(link),
                Err(NotTaken::Link(e)) if again(&e) => {}
                Err(e) => return Err(format!("party {to} at {addr} did not take this party's link: {e}")),
            },
            Err(e) if again(&e) => {}
            Err(e) => return Err(format!("cannot link to party {to} at {addr}: {e}")),
        }
        std::thread::sleep(RETRY_EVERY.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// The listener thread: accepts until `stop`, each connection's handshake on a thread of its own
/// so that a slow one holds up no other, at most [`MAX_HANDSHAKES`] at once.
fn listen(
    listener: TcpListener,
    key: Arc<KeyPair>,
    config: PartyConfig,
    tx: mpsc::Sender<Arrival>,
    stop: Arc<AtomicBool>,
    taken: Arc<Mutex<Vec<Role>>>,
) {
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                let Some((slot, dropped)) = enter(&handshakes, &stream) else {
                    let _ = tx.send(Arrival::Refused(format!("dropped a connection from {from}: its socket failed")));
                    continue;
                };
                let (key, config, report, taken, hs) =
                    (key.clone(), config.clone(), tx.clone(), taken.clone(), handshakes.clone());
                let (hs2, dropped2) = (hs.clone(), dropped.clone());
                let spawned = std::thread::Builder::new().name("cryptgpu handshake".into()).spawn(move || {
                    let authenticated = || leave(&hs, slot, &dropped);
                    let arrival = match admit(stream, from, &key, &config, &taken, &authenticated) {
                        Ok(inbound) => Arrival::Linked(inbound),
                        Err(reason) => Arrival::Refused(reason),
                    };
                    // Also when it ended before its handshake did.
                    leave(&hs, slot, &dropped);
                    let _ = report.send(arrival);
                });
                if let Err(e) = spawned {
                    leave(&hs2, slot, &dropped2);
                    let _ = tx.send(Arrival::Refused(format!("dropped a connection from {from}: {e}")));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(25)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Arrival::Refused(format!("accepting a connection failed: {e}")));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Runs the handshake of one connection and checks its purpose against the key it proved.
/// `authenticated` ends the handshake's count among the [`MAX_HANDSHAKES`], and says whether the
/// listener dropped it meanwhile.
fn admit(
    stream: TcpStream,
    from: SocketAddr,
    key: &KeyPair,
    config: &PartyConfig,
    taken: &Mutex<Vec<Role>>,
    authenticated: &dyn Fn() -> bool,
) -> Result<Inbound, String> {
    let me = config.id;
    let keys = &config.parties.keys;
    let (next, prev) = ((me + 1) % 3, (me + 2) % 3);
    let refused = |e: &dyn std::fmt::Display| format!("party {me} refused a connection from {from}: {e}");
    stream.set_nonblocking(false).map_err(|e| refused(&e))?;
    let probe = stream.try_clone().ok();
    let policy = LinkPolicy::Only(vec![keys[next], keys[prev], config.owner_key]);
    let accepted = Link::accept(stream, &purpose_to(me), key, &policy, link_options());
    if authenticated() {
        return Err(format!(
            "party {me} dropped a connection from {from} unfinished: {MAX_HANDSHAKES} later connections were in their \
             handshakes (the oldest is dropped first)"
        ));
    }
    let mut link = accepted.map_err(|e| match e {
        ChannelError::Refused { reason, .. } => refused(&format!(
            "{}: it is neither party {next}'s nor party {prev}'s in --party-keys, nor --owner-key",
            reason.strip_prefix("we refused it: ").unwrap_or(&reason)
        )),
        other => refused(&other),
    })?;
    let role = match link.remote_key() {
        k if k == config.owner_key => Role::Owner,
        k if k == keys[next] => Role::Party(next),
        _ => Role::Party(prev),
    };
    let expected = match role {
        Role::Owner => OWNER_PURPOSE.to_string(),
        Role::Party(p) => party_purpose(p, me),
    };
    let hello = link.recv_limited(MAX_NOTE_BYTES).map_err(|e| refused(&format!("{role} sent no purpose: {e}")))?;
    let said = printable(&hello.payload);
    let refusal = {
        let mut taken = lock(taken);
        if hello.tag != tag::HELLO {
            Some(format!("{role} sent message tag {:#x} instead of its purpose", hello.tag))
        } else if said != expected {
            Some(format!("the key of {role} asked for '{said}'; it may only ask for '{expected}'"))
        } else if taken.contains(&role) {
            Some(format!("{role} is already linked to party {me}"))
        } else {
            // The first owner is the one; a party's link is taken when the setup uses it.
            if role == Role::Owner {
                taken.push(role);
            }
            None
        }
    };
    if let Some(reason) = refusal {
        let _ = link.send(tag::REFUSED, reason.as_bytes());
        return Err(refused(&reason));
    }
    // The owner is welcomed once this party is ready (`accept_owner`): its connection returns then.
    if let Role::Party(_) = role {
        link.send(tag::WELCOME, &[]).map_err(|e| refused(&e))?;
    }
    Ok(Inbound { role, link: Box::new(link), from, probe })
}

/// Runs party `config.id` on `listener`: links with the other two parties, waits for the data
/// owner and serves its run until the owner stops it. Progress goes to `log` (one line when
/// ready).
pub fn run_party(
    listener: TcpListener,
    key: Arc<KeyPair>,
    config: PartyConfig,
    log: &mut dyn FnMut(&str),
) -> Result<(), MpcError> {
    let id = config.id;
    let mut node = PartyNode::start(listener, key, config.clone())?;
    let (next, prev) = ((id + 1) % 3, (id + 2) % 3);
    log(&format!(
        "cryptgpu party {id} listening on {}; linking with {} and {}",
        node.local_addr(),
        config.parties.name(next),
        config.parties.name(prev)
    ));
    let party = node.link_parties(log)?;
    log(&format!(
        "cryptgpu party {id} ready: linked with parties {next} and {prev}; waiting for the data owner (key {})",
        config.owner_key
    ));
    let mut owner = node.accept_owner(log)?;
    log(&format!("cryptgpu party {id}: serving {}", owner.peer()));
    crate::session::serve_with_store(party, owner.as_mut(), config.store.as_deref())
}

/// The data owner's links to the three parties (party 0, 1, 2), each pinned to its key. Every
/// party is tried, so that one that cannot be reached does not leave the others waiting: those
/// reached see their link close, and stop.
pub fn connect_parties(parties: &Parties, key: &KeyPair) -> Result<Vec<Box<dyn Channel>>, MpcError> {
    let mut links: Vec<Box<dyn Channel>> = Vec::new();
    let mut failures = Vec::new();
    for i in 0..3 {
        let addr = &parties.addrs[i];
        let pinned = LinkPolicy::Only(vec![parties.keys[i]]);
        let linked = Link::connect(addr, &purpose_to(i), key, &pinned, link_options())
            .map_err(|e| format!("cannot reach party {i} at {addr}: {e}"))
            .and_then(|mut link| {
                introduce(&mut link, OWNER_PURPOSE)
                    .map_err(|e| format!("party {i} at {addr} did not take the data owner's link: {e}"))?;
                Ok(link)
            });
        match linked {
            Ok(link) => links.push(Box::new(Named { link, name: parties.name(i), cause: None })),
            Err(e) => failures.push(e),
        }
    }
    match failures.is_empty() {
        true => Ok(links),
        false => Err(MpcError::Invalid(failures.join("; "))),
    }
}
