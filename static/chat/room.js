// The room page: history and live messages merged by seq, the composer and its outbox, typing,
// members with presence, and moderation. Every user-provided string goes through textContent.

import { api, apiPage } from "./api.js";
import { RoomConnection, backoffDelay } from "./connection.js";
import { Outbox } from "./outbox.js";

const root = document.getElementById("room");
const ROOM = root.dataset.room;
const ME = root.dataset.user;
const byId = (id) => document.getElementById(id);

const ui = {
  title: byId("room-title"),
  visibility: byId("room-visibility"),
  status: byId("status"),
  statusText: byId("status-text"),
  retry: byId("retry"),
  log: byId("log"),
  messages: byId("messages"),
  pending: byId("pending"),
  loadEarlier: byId("load-earlier"),
  logStart: byId("log-start"),
  jump: byId("jump"),
  typing: byId("typing"),
  stopped: byId("stopped"),
  composer: byId("composer"),
  input: byId("composer-input"),
  inputLabel: byId("composer-label"),
  send: byId("send"),
  count: byId("composer-count"),
  composerNotice: byId("composer-notice"),
  memberList: byId("member-list"),
  bannedHeading: byId("banned-heading"),
  bannedList: byId("banned-list"),
  onlineCount: byId("online-count"),
  moreMembers: byId("more-members"),
  memberSearch: byId("member-search"),
  membersEmpty: byId("members-empty"),
  membersToggle: byId("members-toggle"),
  announcer: byId("announcer"),
  arrivals: byId("arrivals"),
  toast: byId("toast"),
  confirmDialog: byId("confirm-dialog"),
  moderateDialog: byId("moderate-dialog"),
  messageTemplate: byId("message-template"),
  memberTemplate: byId("member-template"),
};

const RANK = { member: 1, moderator: 2, owner: 3 };
const VISIBILITY_NAMES = { public: "Public", read_only: "Read-only", private: "Private" };
const STAFF_RANK = 4;
const GROUP_WITHIN_MS = 5 * 60 * 1000; // consecutive messages by one author share a header
const TYPING_SHOWN_MS = 5000;
const TYPING_SENT_EVERY_MS = 3000; // the server accepts one typing frame per 2 s
const READ_MARK_DELAY_MS = 1500;
const NEWEST_PAGE = 50;
const ARRIVALS_KEPT = 20; // the lines #arrivals keeps for a reader browsing it
const MISSED_READ_OUT = 3; // a catch-up bringing more from others is told as a count
const CONTROL_CHARACTERS = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/g;
const MAX_TIMEOUT_MS = 2 ** 31 - 1;
// `unavailable` without a client_id: the database could not answer a request; it is asked again
// after this long if still unanswered (docs/protocol.md §4: try again shortly).
const UNAVAILABLE_RETRY_MS = 3000;

const STOPPED_TEXT = {
  removed: ["You were removed from this room.", "A moderator removed you from this room."],
  banned: ["You were banned from this room.", "A moderator banned you from this room."],
  forbidden: [
    "You no longer have access to this room.",
    "You were removed or banned, or the room was made private.",
  ],
  gone: ["This room no longer exists.", "It was archived or deleted."],
  "signed-out": ["You are signed out.", "Your session ended. Sign in again to keep chatting."],
  closed: ["The connection was closed.", "Reload the page to connect again."],
};

const state = {
  role: null,
  staff: false,
  moderator: false,
  // As the page was drawn, until hello: a composer that cannot post is closed from the start.
  canPost: root.dataset.canPost !== "false",
  mutedUntil: root.dataset.mutedUntil || null,
  visibility: "public",
  maxLength: Number(root.dataset.maxLength) || 4000,
  historyLimit: 100,
  loaded: false, // the newest page has arrived once
  caughtUp: false, // everything since the last hello has arrived: the outbox may flush
  // Everything up to resumeSeq has arrived (history pages, and live frames once caught up): the
  // next catch-up asks for what follows it. Live frames that arrive during a catch-up are
  // newer than the gap being filled, so they only move seenSeq until the catch-up ends.
  resumeSeq: 0,
  seenSeq: 0, // highest seq received at all
  hasOlder: false,
  loadingOlder: false,
  stopped: null,
  everOpen: false,
};
const messages = new Map(); // seq -> {data, el}
// Deletions of messages not shown yet: a `deleted` frame can overtake its message when the
// message waits for a gap to be filled, or the history page that shows a message older than
// hello.last_seq. The message then arrives as a tombstone.
const deletedAhead = new Set();
const pendingEls = new Map(); // client_id -> element
const members = new Map(); // username -> member, as the REST API gives it
const guests = new Set(); // users the room's presence shows whom the API says are not members
let online = new Set();
const typers = new Map(); // username -> timeout id

const connection = new RoomConnection(ROOM, { onFrame, onState });
const outbox = new Outbox(`chat:outbox:${ME}:${ROOM}`, {
  send: (frame) => state.caughtUp && connection.send(frame),
  onChange: renderPending,
});

// --- frames --------------------------------------------------------------------------------------

function onFrame(frame) {
  switch (frame.type) {
    case "hello":
      return onHello(frame);
    case "history":
      return onHistory(frame);
    case "message":
      return onLiveMessage(frame);
    case "ack":
      return onAck(frame);
    case "deleted":
      resync.touched.add(frame.seq);
      return onDeleted(frame);
    case "restored":
      resync.touched.add(frame.message.seq);
      deletedAhead.delete(frame.message.seq);
      if (messages.has(frame.message.seq)) changeLog(() => upsertMessage(frame.message));
      return undefined;
    case "resync":
      return onResync(frame);
    case "typing":
      return onTyping(frame.user);
    case "presence":
      return onPresence(frame);
    case "membership":
      return onMembership(frame);
    case "room":
      return onRoomChanged(frame);
    case "error":
      return onError(frame);
    default:
      return undefined;
  }
}

function onHello(hello) {
  // Tickets come from the browser's session, not from this page: signed out in another tab and
  // signed in as someone else, this page would send its outbox under their name.
  if (hello.user !== ME) {
    connection.stop("signed-out");
    return;
  }
  state.role = hello.role;
  state.moderator = hello.moderator;
  // Staff outrank every room role, also in a room where they hold one (chat.permissions.rank).
  state.staff = Boolean(hello.staff);
  state.canPost = hello.can_post;
  state.mutedUntil = hello.muted_until;
  state.visibility = hello.visibility;
  state.maxLength = hello.limits.max_length;
  state.historyLimit = hello.limits.history_limit;
  resync.maxSeqs = hello.limits.resync_max_seqs ?? resync.maxSeqs;
  // History pages and live frames from here on carry the current state of what they bring.
  deletedAhead.clear();
  showRoom(hello.title);
  online = new Set(hello.presence);
  state.caughtUp = false;
  state.loadingOlder = false; // an answer the last socket never got will not come
  outbox.requeue();
  if (!state.loaded) {
    // No complete first page yet: start over from the newest messages.
    messages.clear();
    ui.messages.replaceChildren();
    state.resumeSeq = 0;
    state.seenSeq = 0;
    if (hello.last_seq > 0) {
      requestCatchUp({ type: "history", limit: Math.min(NEWEST_PAGE, state.historyLimit) });
    } else {
      state.loaded = true;
      caughtUp();
    }
  } else {
    startResync();
    if (state.resumeSeq < hello.last_seq) requestMissed();
    else caughtUp();
  }
  renderMessageControls();
  updateComposer();
  renderJoinOffer();
  renderMembers();
  restartMembers();
}

// --- resync: what changed among the messages shown while the socket was away ---------------------
// Live `deleted` and `restored` frames only reach an open socket. After a reconnect the client
// asks, hello.limits.resync_max_seqs at a time, which of the messages it shows (up to resumeSeq)
// were deleted or restored meanwhile. A live frame about a seq while its answer is on the way is
// newer than the answer, so the answer leaves that seq alone.

const resync = { upto: 0, from: null, touched: new Set(), maxSeqs: 1000, retry: null };

function startResync() {
  resync.upto = state.resumeSeq;
  requestResync(Number(ui.messages.querySelector("[data-seq]")?.dataset.seq ?? 0));
}

function requestResync(from) {
  clearTimeout(resync.retry);
  resync.from = null;
  resync.touched.clear();
  if (from < 1 || from > resync.upto) return;
  const to = Math.min(resync.upto, from + resync.maxSeqs - 1);
  const deleted = [];
  for (const [seq, entry] of messages) {
    if (seq >= from && seq <= to && entry.data.deleted) deleted.push(seq);
  }
  if (connection.send({ type: "resync", from, to, deleted })) resync.from = from;
}

// An `unavailable` error (the database failed) may be the answer to the resync: ask again.
function retryResync() {
  const from = resync.from;
  if (from === null) return false;
  clearTimeout(resync.retry);
  resync.retry = setTimeout(() => {
    if (resync.from === from) requestResync(from);
  }, UNAVAILABLE_RETRY_MS);
  return true;
}

function onResync(frame) {
  if (frame.from !== resync.from) return; // not the answer awaited (or not ours to apply)
  changeLog(() => {
    for (const seq of frame.deleted) if (!resync.touched.has(seq)) onDeleted({ seq });
    for (const message of frame.restored) {
      if (!resync.touched.has(message.seq) && messages.has(message.seq)) upsertMessage(message);
    }
    return false;
  });
  requestResync(frame.to + 1);
}

// --- catch-up: the newest page, or the pages after resumeSeq, up to hello.last_seq ---------------
// Until the catch-up ends the log is busy and the outbox waits, so its request on the way is
// remembered: an `unavailable` error may be the answer. The next hello starts a catch-up of its
// own, which drops a retry the last socket left.

const catchUp = { awaited: null, retry: null };

function requestCatchUp(frame) {
  clearTimeout(catchUp.retry);
  catchUp.awaited = connection.send(frame) ? frame : null;
}

function retryCatchUp() {
  const frame = catchUp.awaited;
  if (frame === null) return false;
  clearTimeout(catchUp.retry);
  catchUp.retry = setTimeout(() => {
    if (catchUp.awaited === frame) requestCatchUp(frame);
  }, UNAVAILABLE_RETRY_MS);
  return true;
}

function requestMissed() {
  requestCatchUp({ type: "history", after: state.resumeSeq, limit: state.historyLimit });
}

function caughtUp() {
  clearTimeout(catchUp.retry);
  catchUp.awaited = null;
  tellMissed();
  // The hub sends every message after hello's last_seq, in order, and the catch-up has reached
  // last_seq: nothing below what we have seen is missing now.
  state.resumeSeq = Math.max(state.resumeSeq, state.seenSeq);
  state.caughtUp = true;
  ui.log.setAttribute("aria-busy", "false");
  updateLogEdges();
  outbox.pump();
  markRead();
}

function onHistory(frame) {
  const older = "before" in frame;
  // A request asked again can be answered twice: only the awaited answer moves the catch-up on.
  if (!older && (catchUp.awaited === null || frame.after !== catchUp.awaited.after)) return;
  let shown = 0;
  changeLog(
    () => {
      for (const message of frame.messages) {
        // Pages after a seq, and the newest page, run without holes up to their last message.
        if (!receive(message, !older)) continue;
        shown += 1;
        if (!older) noteMissed(message); // missed while away: new to the reader
      }
      return shown > 0;
    },
    { prepend: older },
  );
  if (older) {
    state.hasOlder = frame.has_more;
    state.loadingOlder = false;
    const count = shown === 1 ? "1 earlier message" : `${shown} earlier messages`;
    const start = frame.has_more ? "" : "This is the beginning of the room.";
    // A page the log already held (a reconnect's history got there first) adds nothing to say.
    announce(shown ? `${count} loaded. ${start}`.trim() : start || "No earlier messages.");
  } else if ("after" in frame && frame.has_more) {
    requestMissed();
    return;
  } else {
    if (!("after" in frame)) state.hasOlder = frame.has_more;
    state.loaded = true;
    caughtUp();
  }
  updateLogEdges();
}

function onLiveMessage(message) {
  const added = changeLog(() => receive(message, state.caughtUp), { own: message.author === ME });
  if (!added) return;
  announceArrival(message);
  stopTyping(message.author);
  if (message.author !== ME) noteUnseen();
  updateLogEdges();
  markRead();
}

// One message from the ordered stream (live or history): merged by seq, resolving our outbox.
// `contiguous`: every message before it has arrived too, so a resume may start after it.
function receive(message, contiguous) {
  if (message.author === ME && message.client_id) outbox.resolve(message.client_id);
  state.seenSeq = Math.max(state.seenSeq, message.seq);
  if (contiguous) state.resumeSeq = Math.max(state.resumeSeq, message.seq);
  return upsertMessage(message);
}

function onAck(frame) {
  const entry = outbox.resolve(frame.client_id);
  // The broadcast of our own message may come before or after its ack; whichever is first shows
  // it. The ack does not move resumeSeq: messages before it may still be on their way.
  if (entry && !messages.has(frame.seq)) {
    changeLog(
      () =>
        upsertMessage({
          seq: frame.seq,
          room: ROOM,
          author: ME,
          body: entry.body,
          client_id: entry.clientId,
          created_at: new Date().toISOString(),
        }),
      { own: true },
    );
    updateLogEdges();
    markRead();
  }
}

function onDeleted(frame) {
  const known = messages.get(frame.seq);
  if (!known) {
    // Everything up to resumeSeq has arrived: an unknown seq there is older than the pages
    // loaded. Above it, even below seenSeq, the message may still come in a history page read
    // before the deletion.
    if (frame.seq > state.resumeSeq) deletedAhead.add(frame.seq);
    return;
  }
  const { seq, room, author, created_at } = known.data;
  upsertMessage({ seq, room, author, created_at, deleted: true });
}

function onError(frame) {
  if (frame.code === "unavailable" && !frame.client_id) {
    // It does not say which request it answers: each one still unanswered is asked again, and
    // "Load earlier", which the reader asked for, may be clicked again (the toast says why).
    // A page that only asks again by itself has nothing to tell the reader.
    const resyncAskedAgain = retryResync();
    const catchUpAskedAgain = retryCatchUp();
    const readerAsked = state.loadingOlder;
    state.loadingOlder = false;
    if ((resyncAskedAgain || catchUpAskedAgain) && !readerAsked) return;
  }
  if (frame.client_id && outbox.has(frame.client_id)) {
    outbox.refuse(frame.client_id, frame.code, frame.detail);
    if (frame.code === "muted" || frame.code === "forbidden") lookUpMembers([ME]);
    return;
  }
  showToast(frame.detail);
}

function onRoomChanged(frame) {
  // An owner changed the title or the mode; losing access closes the socket instead.
  state.visibility = frame.visibility;
  state.canPost = frame.can_post;
  showRoom(frame.title);
  updateComposer();
}

function onMembership(frame) {
  const wasMuted = mutedNow();
  state.role = frame.role;
  state.mutedUntil = frame.muted_until;
  // Promotions take effect live; a demotion closes the socket (4401) and a new hello follows.
  state.moderator = state.staff || frame.role === "owner" || frame.role === "moderator";
  state.canPost = state.visibility !== "read_only" || state.moderator;
  if (mutedNow()) announce(`You are muted until ${formatTime(frame.muted_until)}.`);
  else if (wasMuted) announce("Your mute was lifted: you may post again.");
  updateComposer();
  renderJoinOffer();
  renderMessageControls();
  if (state.moderator !== membersReadAs) restartMembers();
  else lookUpMembers([ME]);
}

// --- messages ------------------------------------------------------------------------------------

// New messages are read out from #arrivals, not from the log, which is no live region: the log
// also grows when a page of older messages comes in, and when one's own message moves from the
// pending list to the stored ones; neither is news. Messages from others are read once; one's
// own are not read back, only said when they fail (renderPending). The first page is not read
// out, as the log was busy while it loaded.
function announceArrival(message) {
  if (!state.loaded || message.author === ME || messages.get(message.seq)?.data.deleted) return;
  const line = document.createElement("p");
  line.textContent = `${authorName(message)}: ${message.body}`;
  ui.arrivals.append(line);
  // Lines removed are not read (additions only): the region stays short for a reader browsing it.
  while (ui.arrivals.childElementCount > ARRIVALS_KEPT) ui.arrivals.firstElementChild.remove();
}

// What a catch-up after a reconnect brought from others, told once it is complete: each read
// out if they are few, else their count (a long absence would read out a page at a time).
let missed = [];

function noteMissed(message) {
  if (state.loaded && message.author !== ME) missed.push(message);
}

function tellMissed() {
  const shown = missed.filter((message) => !messages.get(message.seq)?.data.deleted);
  missed = [];
  if (shown.length <= MISSED_READ_OUT) {
    for (const message of shown) announceArrival(message);
  } else {
    announce(`${shown.length} new messages while you were away.`);
  }
}

function newMessageElement() {
  return ui.messageTemplate.content.firstElementChild.cloneNode(true);
}

// A message whose author's account was deleted keeps no name.
function authorName(message) {
  return message.author ?? "deleted user";
}

function renderMessageInto(li, message) {
  const author = authorName(message);
  const avatar = li.querySelector(".avatar");
  avatar.textContent = initial(author);
  avatar.className = `avatar avatar-${colorIndex(author)}`;
  li.querySelector(".author").textContent = author;
  const time = li.querySelector(".time");
  time.dateTime = message.created_at;
  time.textContent = formatTime(message.created_at);
  time.title = formatFull(message.created_at);
  li.querySelector(".body").textContent = message.deleted
    ? "This message was deleted."
    : message.body;
  li.classList.toggle("own", message.author === ME);
  li.classList.toggle("deleted", Boolean(message.deleted));
}

function upsertMessage(message) {
  if (deletedAhead.delete(message.seq) && !message.deleted) {
    const { seq, room, author, created_at } = message;
    message = { seq, room, author, created_at, deleted: true };
  }
  const known = messages.get(message.seq);
  if (known) {
    known.data = message;
    renderMessageInto(known.el, message);
    renderDeleteControl(known);
    return false;
  }
  const li = newMessageElement();
  li.dataset.seq = String(message.seq);
  // The delete button's description is the body it would delete (a tombstone's has no button).
  const body = li.querySelector(".body");
  body.id = `message-${message.seq}-body`;
  li.querySelector(".message-delete").setAttribute("aria-describedby", body.id);
  const entry = { data: message, el: li };
  messages.set(message.seq, entry);
  renderMessageInto(li, message);
  renderDeleteControl(entry);
  ui.messages.insertBefore(li, firstAbove(message.seq));
  regroup(li);
  if (li.nextElementSibling) regroup(li.nextElementSibling);
  return true;
}

// The shown message with the lowest seq above `seq` (null: none). Live messages are usually the
// newest; pages of older messages land anywhere, so the rest is a binary search, not a walk.
function firstAbove(seq) {
  const shown = ui.messages.children;
  let low = 0;
  let high = shown.length;
  if (high === 0 || Number(shown[high - 1].dataset.seq) < seq) return null;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (Number(shown[middle].dataset.seq) < seq) low = middle + 1;
    else high = middle;
  }
  return shown[low];
}

// A message directly after one by the same author, within minutes, drops its header.
function regroup(li) {
  const previous = li.previousElementSibling;
  const current = messages.get(Number(li.dataset.seq))?.data;
  const prior = previous ? messages.get(Number(previous.dataset.seq))?.data : null;
  const continued =
    Boolean(current && prior) &&
    prior.author === current.author &&
    new Date(current.created_at) - new Date(prior.created_at) < GROUP_WITHIN_MS;
  li.classList.toggle("continued", continued);
}

function canDelete(message) {
  return !message.deleted && (state.moderator || message.author === ME);
}

// Tabbing through the log, a screen reader user hears each button: its name says whose message
// it deletes and when it was sent, also where a run of messages by one author shows no header.
function renderDeleteControl(entry) {
  const button = entry.el.querySelector(".message-delete");
  const sent = formatTime(entry.data.created_at);
  button.querySelector(".visually-hidden").textContent =
    `Delete message from ${authorName(entry.data)}${sent ? ` at ${sent}` : ""}`;
  hideKeepingFocus(button, !canDelete(entry.data));
}

function renderMessageControls() {
  for (const entry of messages.values()) renderDeleteControl(entry);
}

function renderPending(entry) {
  let li = pendingEls.get(entry.clientId);
  if (entry.state === "done" || entry.state === "discarded") {
    li?.remove();
    pendingEls.delete(entry.clientId);
    updateLogEdges();
    return;
  }
  if (!li) {
    li = newMessageElement();
    li.classList.add("pending");
    li.dataset.clientId = entry.clientId;
    renderMessageInto(li, { author: ME, body: entry.body, created_at: entry.createdAt });
    pendingEls.set(entry.clientId, li);
    changeLog(
      () => {
        ui.pending.append(li);
        return true;
      },
      { own: true },
    );
    updateLogEdges();
  }
  // The log is no live region: a message that fails is said (not one that had failed before the
  // page loaded).
  const failed = entry.state === "failed";
  if (failed && li.dataset.state && li.dataset.state !== "failed") {
    announce(`Not sent: ${entry.error}`);
  }
  li.dataset.state = entry.state;
  li.classList.toggle("failed", failed);
  let label = "Waiting for connection…";
  if (failed) label = `Not sent: ${entry.error}`;
  else if (connection.isOpen) label = "Sending…";
  li.querySelector(".message-state").textContent = label;
  li.querySelector(".message-actions").hidden = !failed;
}

// Keep the newest message in view when the reader was already at the bottom; otherwise leave the
// view where it is and offer a way down.
function changeLog(mutate, { own = false, prepend = false } = {}) {
  const log = ui.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  const fromBottom = log.scrollHeight - log.scrollTop;
  const added = mutate();
  if (atBottom || own) {
    log.scrollTop = log.scrollHeight;
  } else if (prepend) {
    log.scrollTop = log.scrollHeight - fromBottom;
  } else if (added) {
    ui.jump.hidden = false;
  }
  return added;
}

function updateLogEdges() {
  const empty = messages.size === 0 && pendingEls.size === 0;
  hideKeepingFocus(ui.loadEarlier, !(state.loaded && state.hasOlder));
  ui.logStart.hidden = !state.loaded || state.hasOlder;
  ui.logStart.textContent = empty
    ? "No messages yet. Say hello!"
    : "This is the beginning of the room.";
}

// A control that hides while focused (the delete button of the message it just deleted, "Load
// earlier" at the first message, "Retry now" once it has been pressed, "Show more members" at
// the last page) would drop a keyboard user at the top of the page: focus goes to `next`
// instead, the log unless said otherwise.
function hideKeepingFocus(element, hidden, next = ui.log) {
  if (hidden && element.contains(document.activeElement)) next.focus({ preventScroll: true });
  element.hidden = hidden;
}

function highestSeq() {
  return Number(ui.messages.lastElementChild?.dataset.seq ?? 0);
}

// --- reading -------------------------------------------------------------------------------------

let readSent = 0;
let readTimer = null;

function markRead() {
  if (!state.role || document.visibilityState !== "visible" || readTimer) return;
  readTimer = setTimeout(async () => {
    readTimer = null;
    const seq = highestSeq();
    if (seq <= readSent || !state.role) return;
    readSent = seq;
    try {
      await api(`/api/rooms/${ROOM}/read/`, { method: "POST", body: { seq } });
    } catch {
      readSent = 0;
    }
  }, READ_MARK_DELAY_MS);
}

let unseen = 0;

// The header, the labels that name the room and the tab's title: the first paint's until an
// owner changes the title or the mode (the `room` frame, or the next hello).
function showRoom(title) {
  ui.title.textContent = title;
  ui.visibility.textContent = VISIBILITY_NAMES[state.visibility] ?? state.visibility;
  ui.log.setAttribute("aria-label", `Messages in ${title}`);
  ui.inputLabel.textContent = `Message ${title}`;
  renderDocumentTitle();
}

function renderDocumentTitle() {
  const count = unseen ? `(${unseen}) ` : "";
  document.title = `${count}${ui.title.textContent} · Securechat`;
}

function noteUnseen() {
  if (document.visibilityState === "visible") return;
  unseen += 1;
  renderDocumentTitle();
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible") return;
  unseen = 0;
  renderDocumentTitle();
  markRead();
});

// --- typing --------------------------------------------------------------------------------------

function onTyping(user) {
  clearTimeout(typers.get(user));
  typers.set(
    user,
    setTimeout(() => stopTyping(user), TYPING_SHOWN_MS),
  );
  renderTyping();
}

function stopTyping(user) {
  if (!typers.has(user)) return;
  clearTimeout(typers.get(user));
  typers.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...typers.keys()];
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = "Several people are typing…";
  ui.typing.textContent = text;
}

// --- composer ------------------------------------------------------------------------------------

let lastTypingSent = 0;
let muteTimer = null;

function bodyLength(text) {
  return [...text].length; // code points, as the server counts
}

function isMuted(until) {
  return Boolean(until) && new Date(until) > new Date();
}

// Muted in this room as the server applies it: staff post while muted (chat.permissions).
function mutedNow() {
  return !state.staff && isMuted(state.mutedUntil);
}

// Where a reader goes on from a control that is done (Retry now, New messages): to write, or
// where the page has stopped, to why; or to the log for a reader who cannot write (muted,
// read-only): a disabled composer takes no focus, which would fall to the page.
function goOnTo() {
  if (state.stopped) return ui.stopped;
  return composerBlocked() ? ui.log : ui.input;
}

function composerBlocked() {
  return Boolean(state.stopped) || !state.canPost || mutedNow();
}

function updateCounter() {
  const length = bodyLength(ui.input.value);
  const over = length > state.maxLength;
  const count = `${length.toLocaleString()} / ${state.maxLength.toLocaleString()}`;
  ui.count.textContent = over
    ? `${count}: ${(length - state.maxLength).toLocaleString()} too many`
    : count;
  ui.count.classList.toggle("near", length > state.maxLength * 0.9 && !over);
  ui.count.classList.toggle("over", over);
  ui.input.setAttribute("aria-invalid", String(over));
  ui.send.disabled = composerBlocked() || over || !ui.input.value.trim();
}

function updateComposer() {
  clearTimeout(muteTimer);
  const muted = mutedNow();
  let notice = "";
  if (!state.canPost) notice = "Only moderators can post in this read-only room.";
  else if (muted) notice = `You are muted until ${formatTime(state.mutedUntil)}.`;
  // Someone else's action (a mute, the room made read-only) can disable the box being typed in:
  // focus goes to the notice that says why, and back to the box when it may post again.
  const blocked = composerBlocked();
  const focused = document.activeElement;
  ui.composerNotice.textContent = notice;
  ui.composerNotice.hidden = !notice;
  ui.composer.hidden = Boolean(state.stopped);
  ui.input.disabled = blocked;
  if (state.stopped && ui.composer.contains(focused)) ui.stopped.focus();
  else if (blocked && notice && focused === ui.input) ui.composerNotice.focus();
  else if (!blocked && focused === ui.composerNotice) ui.input.focus();
  if (muted) {
    const wait = new Date(state.mutedUntil) - new Date() + 500;
    muteTimer = setTimeout(updateComposer, Math.min(wait, MAX_TIMEOUT_MS));
  }
  updateCounter();
}

function submit() {
  const body = ui.input.value.replace(CONTROL_CHARACTERS, "");
  if (composerBlocked() || !body.trim() || bodyLength(body) > state.maxLength) return;
  outbox.add(body);
  ui.input.value = "";
  updateCounter();
  outbox.pump();
  if (!connection.isOpen) {
    announce("Waiting for connection: your message will be sent when it is back.");
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
  ui.input.focus();
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});

ui.input.addEventListener("input", () => {
  updateCounter();
  const now = Date.now();
  if (!ui.input.value.trim() || composerBlocked() || now - lastTypingSent < TYPING_SENT_EVERY_MS) {
    return;
  }
  if (connection.send({ type: "typing" })) lastTypingSent = now;
});

ui.pending.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  const clientId = button?.closest("li")?.dataset.clientId;
  if (!clientId) return;
  if (button.dataset.action === "retry") {
    outbox.retry(clientId);
    outbox.pump();
  } else if (button.dataset.action === "discard") {
    outbox.discard(clientId);
  }
});

// --- deleting ------------------------------------------------------------------------------------

let deleting = null;

ui.messages.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action='delete']");
  if (!button) return;
  const entry = messages.get(Number(button.closest("li").dataset.seq));
  if (!entry || !canDelete(entry.data)) return;
  deleting = entry.data.seq;
  byId("confirm-quote").textContent = entry.data.body;
  ui.confirmDialog.showModal();
});

ui.confirmDialog.addEventListener("close", () => {
  const seq = deleting;
  deleting = null;
  if (ui.confirmDialog.returnValue !== "confirm" || seq === null) return;
  if (connection.send({ type: "delete", seq })) return;
  api(`/api/rooms/${ROOM}/messages/${seq}/`, { method: "DELETE" }).then(
    () => onDeleted({ seq }),
    (error) => showToast(error.message),
  );
});

// --- members -------------------------------------------------------------------------------------

// The drawer lists the room's members a page at a time ("Show more members"), and the users its
// presence shows: those the pages have not brought are asked for by name, a request for up to
// LOOKUP_BATCH of them, so a room of many thousands costs a request a page the reader asks for,
// not one per hundred members at every open or join.
// The search box asks for the members whose name starts with what it holds (`?q=`), in the same
// pages; the members already known stay known (the moderation dialog and the presence tags read
// them) and are shown when they match.
const LOOKUP_BATCH = 100;
// A lookup's query stays this short: a username is up to 150 letters of any script, each up to 9
// characters in a URL, and nginx refuses a request line over 8 KB by default (daphne over 16 KB).
const LOOKUP_QUERY_MAX = 6000;
let membersNext = null; // the path of the member list's next page, if any
let lookupTimer = null;
const lookingUp = new Set(); // names whose lookup is under way
let memberQuery = ""; // the search box's text, trimmed
let answeredQuery = ""; // the search whose first page the server has answered
let searchTimer = null;
let restartOwed = false; // a hello's start-over, done when a first page comes in
let membersReadAs = null; // state.moderator when the members known were asked for

// What the API said of these users: members (role, mute, ban), or, for `asked` names it gave no
// membership for, guests.
function learnMembers(found, asked = []) {
  for (const member of found) {
    members.set(member.username, member);
    guests.delete(member.username);
  }
  const answered = new Set(found.map((member) => member.username));
  for (const name of asked) {
    if (answered.has(name)) continue;
    members.delete(name);
    guests.add(name);
  }
}

function matchesQuery(username) {
  return !memberQuery || username.toLowerCase().startsWith(memberQuery.toLowerCase());
}

// After a hello the drawer starts over: the list's first page again, then the users present
// whom the page does not know are asked about. What it knows of the users present is kept: after a
// server restart every page of a busy room says hello at once, and asking each about everyone
// present again would be a request per hundred of them from every page. A moderator's answers
// carry mutes and bans that others' do not, so a change of standing starts from nothing.
function restartMembers() {
  if (state.moderator !== membersReadAs) {
    members.clear();
    guests.clear();
    membersReadAs = state.moderator;
  }
  restartOwed = true;
  loadMembers();
}

// The first page of the list (of the search's, if any).
async function loadMembers() {
  const query = memberQuery;
  const path = `/api/rooms/${ROOM}/members/${query ? `?q=${encodeURIComponent(query)}` : ""}`;
  let page;
  try {
    page = await apiPage(path);
  } catch (error) {
    firstPageRetry.failed(error);
    return;
  }
  firstPageRetry.succeeded();
  // A later search has its own answer coming, which does the start-over if it is still owed.
  if (query !== memberQuery) return;
  if (restartOwed) {
    // Members the earlier pages brought are asked for again with those pages; the users
    // present stay known.
    for (const name of members.keys()) if (!online.has(name)) members.delete(name);
    for (const name of guests) if (!online.has(name)) guests.delete(name);
  }
  learnMembers(page.items);
  membersNext = page.next;
  answeredQuery = query;
  renderMembers();
  if (restartOwed) {
    restartOwed = false;
    lookUpMembersSoon();
  }
  if (query) {
    const shown = ui.memberList.children.length;
    announce(`${shown} ${shown === 1 ? "member matches" : "members match"}.`);
  }
}

// A member request the server could not answer now (unreachable, busy or failing) is made again
// later, on the socket's backoff from its second step (1-2 s, then twice as long each time up to
// 15-30 s; or when a 429 says), so that a room's pages do not all come back at once. One refused
// for lost access is not: the socket's close says why.
function retrying(run) {
  let failures = 0;
  let timer = null;
  return {
    failed(error) {
      const transient = error.status === 0 || error.status === 429 || error.status >= 500;
      if (!transient || timer !== null) return;
      failures += 1;
      const wait = error.retryAfter != null ? error.retryAfter * 1000 : backoffDelay(failures);
      timer = setTimeout(() => {
        timer = null;
        if (!state.stopped) run(); // a stopped page shows nobody present
      }, wait);
    },
    succeeded() {
      failures = 0;
    },
  };
}

const firstPageRetry = retrying(() => loadMembers());
const lookupRetry = retrying(() => lookUpMembersSoon());

ui.memberSearch.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    const query = ui.memberSearch.value.trim();
    if (query === memberQuery) return;
    memberQuery = query;
    membersNext = null; // the last list's next page is not this one's
    renderMembers(); // at once, from the members known
    loadMembers();
  }, 300);
});

let loadingMoreMembers = false;

async function loadMoreMembers() {
  if (!membersNext || loadingMoreMembers) return;
  const query = memberQuery;
  // Not `disabled`: a focused button that becomes disabled drops the focus to the page.
  loadingMoreMembers = true;
  ui.moreMembers.setAttribute("aria-disabled", "true");
  try {
    const { items, next } = await apiPage(membersNext);
    learnMembers(items);
    if (query !== memberQuery) return; // the list it continued is gone
    membersNext = next;
    renderMembers();
    announce(`${items.length} more members shown.`);
  } catch (error) {
    showToast(error.message);
  } finally {
    loadingMoreMembers = false;
    ui.moreMembers.removeAttribute("aria-disabled");
  }
}

// `names` in batches of at most LOOKUP_BATCH names and LOOKUP_QUERY_MAX characters of query.
function lookupBatches(names) {
  const batches = [];
  let batch = [];
  let length = 0;
  for (const name of names) {
    const param = `username=${encodeURIComponent(name)}`;
    const full = batch.length === LOOKUP_BATCH || length + param.length > LOOKUP_QUERY_MAX;
    if (batch.length && full) {
      batches.push(batch);
      batch = [];
      length = 0;
    }
    batch.push(name);
    length += param.length + 1;
  }
  if (batch.length) batches.push(batch);
  return batches;
}

// `names` as members (role, mute, ban) or, when the API has no membership for them, as guests.
async function lookUpMembers(names) {
  for (const name of names) lookingUp.add(name);
  try {
    for (const batch of lookupBatches(names)) {
      const query = batch.map((name) => `username=${encodeURIComponent(name)}`).join("&");
      let found;
      try {
        ({ items: found } = await apiPage(
          `/api/rooms/${ROOM}/members/?${query}&limit=${LOOKUP_BATCH}`,
        ));
      } catch (error) {
        lookupRetry.failed(error); // the names not asked about yet are asked for with the rest
        return;
      }
      lookupRetry.succeeded();
      learnMembers(found, batch);
      for (const name of batch) lookingUp.delete(name);
    }
  } finally {
    for (const name of names) lookingUp.delete(name);
  }
  if (names.length) renderMembers();
}

// The users present whom the page knows neither as members nor as guests.
function lookUpMembersSoon() {
  // Once per 300 ms at most, from the first join of a burst: a timer restarted at every join
  // never fires while a busy room's joins come faster than that.
  if (lookupTimer !== null) return;
  lookupTimer = setTimeout(() => {
    lookupTimer = null;
    // Not those asked about already: at each join of a burst, a room of thousands would be
    // asked about again, a hundred a request, while the first run is still under way.
    lookUpMembers([...online].filter((name) => !known(name) && !lookingUp.has(name)));
  }, 300);
}

function onPresence(frame) {
  if (frame.joined) online.add(frame.joined);
  if (frame.left) {
    online.delete(frame.left);
    stopTyping(frame.left);
  }
  // A guest may have joined the room since they were asked about (nobody else's page is told):
  // one who comes back is asked about again, as one the page has never seen.
  if (frame.joined) guests.delete(frame.joined);
  renderMembers();
  if (frame.joined && !members.has(frame.joined)) lookUpMembersSoon();
}

function myRank() {
  return state.staff ? STAFF_RANK : (RANK[state.role] ?? 0);
}

function canModerate(username) {
  const member = members.get(username);
  return state.moderator && username !== ME && myRank() > (member ? RANK[member.role] : 0);
}

function memberRow(username) {
  const member = members.get(username);
  const li = ui.memberTemplate.content.firstElementChild.cloneNode(true);
  li.dataset.username = username;
  const isOnline = online.has(username);
  li.classList.toggle("online", isOnline);
  li.querySelector(".member-name").textContent = username;
  const tags = [];
  if (username === ME) tags.push(["you", ""]);
  if (member?.banned) tags.push(["banned", "tag-danger"]);
  else if (member && member.role !== "member") tags.push([member.role, "tag-accent"]);
  else if (!member && guests.has(username)) tags.push(["guest", ""]);
  if (member && isMuted(member.muted_until)) tags.push(["muted", "tag-warn"]);
  const tagBox = li.querySelector(".member-tags");
  const presence = document.createElement("span");
  presence.className = "visually-hidden";
  presence.textContent = isOnline ? "online" : "offline";
  tagBox.append(presence);
  for (const [text, kind] of tags) {
    const tag = document.createElement("span");
    tag.className = `tag ${kind}`.trim();
    tag.textContent = text;
    tagBox.append(tag);
  }
  const manage = li.querySelector(".member-manage");
  manage.hidden = !canModerate(username);
  manage.setAttribute("aria-label", `Manage ${username}`);
  return li;
}

function renderMembers() {
  // The rows are rebuilt: keep keyboard focus on the same member's button.
  const focused = document.activeElement?.closest?.(".member")?.dataset.username;
  const names = new Set(
    [...members.values()].filter((member) => !member.banned).map((member) => member.username),
  );
  for (const name of online) names.add(name);
  const sorted = [...names]
    .filter(matchesQuery)
    .sort((a, b) => Number(online.has(b)) - Number(online.has(a)) || a.localeCompare(b));
  ui.memberList.replaceChildren(...sorted.map(memberRow));
  // Only once the server has answered: none of the members known matching proves nothing.
  const noMatch = memberQuery && answeredQuery === memberQuery && sorted.length === 0;
  ui.membersEmpty.hidden = !noMatch;
  ui.membersEmpty.textContent = `No member's name starts with “${memberQuery}”.`;
  const banned = state.moderator
    ? [...members.values()].filter((member) => member.banned && matchesQuery(member.username))
    : [];
  ui.bannedList.replaceChildren(...banned.map((member) => memberRow(member.username)));
  ui.bannedHeading.hidden = ui.bannedList.hidden = banned.length === 0;
  // The last page hides the button the reader pressed: focus goes to the heading.
  hideKeepingFocus(ui.moreMembers, !membersNext, byId("members-heading"));
  ui.onlineCount.textContent = String(online.size);
  if (focused !== undefined) focusMember(focused);
}

// A member's Manage button as drawn now, or the heading when they have none (or left the list).
function focusMember(username) {
  const rows = [...ui.memberList.children, ...ui.bannedList.children];
  const row = rows.find((candidate) => candidate.dataset.username === username);
  const manage = row?.querySelector(".member-manage");
  (manage && !manage.hidden ? manage : byId("members-heading")).focus();
}

ui.memberList.addEventListener("click", onManageClick);
ui.moreMembers.addEventListener("click", loadMoreMembers);
ui.bannedList.addEventListener("click", onManageClick);

function onManageClick(event) {
  const button = event.target.closest(".member-manage");
  if (button) openModeration(button.closest("li").dataset.username);
}

function setMembersOpen(open) {
  root.classList.toggle("members-open", open);
  ui.membersToggle.setAttribute("aria-expanded", String(open));
  (open ? byId("members-close") : ui.membersToggle).focus();
}

ui.membersToggle.addEventListener("click", () =>
  setMembersOpen(!root.classList.contains("members-open")),
);
// The drawer's backdrop is the room's ::before: a click on it lands on the room itself.
root.addEventListener("click", (event) => {
  if (event.target === root && root.classList.contains("members-open")) setMembersOpen(false);
});
byId("members-close").addEventListener("click", () => setMembersOpen(false));
document.addEventListener("keydown", (event) => {
  const drawerOpen = root.classList.contains("members-open");
  // Escape in the search box clears it (the browser's part); only in an empty one does it close.
  if (event.target === ui.memberSearch && ui.memberSearch.value) return;
  if (event.key === "Escape" && drawerOpen && !document.querySelector("dialog[open]")) {
    setMembersOpen(false);
  }
});

// --- moderation ----------------------------------------------------------------------------------

let target = null;

// Whether the API has said what `username` is here (a member, or a guest).
function known(username) {
  return members.has(username) || guests.has(username);
}

async function openModeration(username) {
  // Present past the pages loaded, and not looked up yet (or the lookup failed): ask first, or
  // the dialog would call a member a guest and offer a guest's actions only.
  if (!known(username)) await lookUpMembers([username]);
  if (!known(username)) {
    showToast(`Could not find out whether ${username} is a member. Try again.`);
    return;
  }
  const member = members.get(username);
  target = username;
  byId("moderate-name").textContent = username;
  let summary = "Not a member: reading as a guest.";
  if (member?.banned) summary = "Banned from this room.";
  else if (member) summary = `${member.role[0].toUpperCase()}${member.role.slice(1)}`;
  if (member && isMuted(member.muted_until)) {
    summary += `, muted until ${formatTime(member.muted_until)}`;
  }
  byId("moderate-summary").textContent = summary;
  byId("moderate-unmute").hidden = !(member && isMuted(member.muted_until));
  const ownerPowers = myRank() > RANK.moderator && member && !member.banned;
  byId("moderate-roles").hidden = !ownerPowers;
  byId("moderate-promote").hidden = member?.role === "moderator";
  byId("moderate-demote").hidden = member?.role === "member";
  byId("moderate-kick").hidden = !member || member.banned;
  ui.moderateDialog.querySelector("[data-action='ban']").textContent = member?.banned
    ? "Lift the ban"
    : "Ban from room";
  byId("moderate-reason").value = "";
  byId("moderate-error").textContent = "";
  ui.moderateDialog.showModal();
}

// The dialog gives focus back to the button that opened it, which a redraw of the list while it
// was open (a presence frame, a member list) has replaced: focus would stay in the closed dialog
// and then fall to the page.
ui.moderateDialog.addEventListener("close", () => {
  const focused = document.activeElement;
  if (!focused || focused === document.body || ui.moderateDialog.contains(focused)) {
    focusMember(target);
  }
});

const DURATIONS = { 10: "10 minutes", 60: "1 hour", 1440: "1 day" };

function moderationRequest(action, button) {
  const member = members.get(target);
  switch (action) {
    case "mute": {
      const minutes = Number(button.dataset.minutes);
      const until = new Date(Date.now() + minutes * 60000).toISOString();
      const done = `${target} is muted for ${DURATIONS[minutes]}.`;
      return [{ method: "PATCH", body: { muted_until: until } }, done];
    }
    case "unmute":
      return [{ method: "PATCH", body: { muted_until: null } }, `${target} is no longer muted.`];
    case "role": {
      const role = button.dataset.role;
      return [{ method: "PATCH", body: { role } }, `${target} is now a ${role}.`];
    }
    case "kick":
      return [{ method: "DELETE" }, `${target} was removed from the room.`];
    case "ban": {
      if (member?.banned) {
        return [{ method: "PATCH", body: { banned: false } }, `${target} is no longer banned.`];
      }
      const reason = byId("moderate-reason").value.trim();
      const body = reason ? { banned: true, reason } : { banned: true };
      return [{ method: "PATCH", body }, `${target} was banned from the room.`];
    }
    default:
      return [null, ""];
  }
}

ui.moderateDialog.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button || !target) return;
  const [request, done] = moderationRequest(button.dataset.action, button);
  if (!request) return;
  const buttons = ui.moderateDialog.querySelectorAll("button[data-action]");
  for (const b of buttons) b.disabled = true;
  try {
    const who = target;
    await api(`/api/rooms/${ROOM}/members/${encodeURIComponent(who)}/`, request);
    ui.moderateDialog.close();
    showToast(done, "info");
    lookUpMembers([who]);
  } catch (error) {
    byId("moderate-error").textContent = error.message;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
});

// --- joining -------------------------------------------------------------------------------------

// A member is not offered to join: the page may have been drawn for a guest who joined in
// another tab, or whom a moderator added, or muted (which makes a member of a public room's guest).
function renderJoinOffer() {
  if (state.role) byId("join-banner")?.remove();
}

byId("join")?.addEventListener("click", async (event) => {
  const button = event.currentTarget; // null once the handler has awaited
  button.disabled = true;
  try {
    const member = await api(`/api/rooms/${ROOM}/join/`, { method: "POST" });
    state.role = member.role;
    byId("join-banner").remove();
    announce("You joined the room.");
    lookUpMembers([ME]);
    markRead();
  } catch (error) {
    button.disabled = false;
    showToast(error.message);
  }
});

// --- connection status ---------------------------------------------------------------------------

let countdown = null;

function onState(status) {
  clearInterval(countdown);
  ui.status.dataset.state = status.state;
  switch (status.state) {
    case "connecting":
      ui.statusText.textContent = state.everOpen ? "Reconnecting…" : "Connecting…";
      break;
    case "open":
      if (state.everOpen && ui.status.dataset.announced === "lost") announce("Reconnected.");
      ui.status.dataset.announced = "";
      state.everOpen = true;
      ui.statusText.textContent = "Connected";
      break;
    case "waiting": {
      if (ui.status.dataset.announced !== "lost") announce("Connection lost. Reconnecting…");
      ui.status.dataset.announced = "lost";
      const tick = () => {
        const seconds = Math.max(0, Math.ceil((status.retryAt - Date.now()) / 1000));
        const prefix = navigator.onLine ? "Reconnecting" : "Offline: retrying";
        ui.statusText.textContent = `${prefix} in ${seconds} s`;
      };
      tick();
      countdown = setInterval(tick, 1000);
      break;
    }
    case "stopped":
      showStopped(status.reason);
      break;
    default:
      break;
  }
  // Pressed, it hides as the page connects: whoever pressed it goes on.
  const hidden = status.state !== "waiting" || Boolean(status.rateLimited);
  hideKeepingFocus(ui.retry, hidden, goOnTo());
  for (const entry of outbox.entries) renderPending(entry);
}

function showStopped(reason) {
  state.stopped = reason;
  state.caughtUp = false;
  const [title, detail] = STOPPED_TEXT[reason] ?? STOPPED_TEXT.forbidden;
  // No connection will come to send what waits: each message says so and may be discarded, or
  // sent again (on a later visit), rather than go out by itself whenever the room is next open.
  for (const entry of outbox.entries) {
    if (entry.state !== "failed") outbox.refuse(entry.clientId, reason, title);
  }
  ui.statusText.textContent = "Disconnected";
  byId("stopped-title").textContent = title;
  byId("stopped-detail").textContent = detail;
  const action = byId("stopped-action");
  if (reason === "signed-out") {
    action.textContent = "Sign in";
    action.href = root.dataset.loginUrl;
    action.hidden = false;
  } else if (reason === "closed") {
    action.textContent = "Reconnect";
    action.href = location.pathname;
    action.hidden = false;
  }
  ui.stopped.hidden = false;
  online.clear();
  for (const user of [...typers.keys()]) stopTyping(user);
  renderMembers();
  updateComposer();
}

ui.retry.addEventListener("click", () => connection.retryNow());

// --- small helpers -------------------------------------------------------------------------------

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayTimeFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
});
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const today = date.toDateString() === new Date().toDateString();
  return (today ? timeFormat : dayTimeFormat).format(date);
}

function formatFull(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : fullFormat.format(date);
}

function initial(name) {
  return ([...name][0] ?? "?").toUpperCase();
}

function colorIndex(name) {
  let hash = 0;
  for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return hash % 8;
}

function announce(text) {
  ui.announcer.textContent = "";
  setTimeout(() => {
    ui.announcer.textContent = text;
  }, 50);
}

let toastTimer = null;

// Seen in the toast, heard through the announcer (the toast itself is hidden from screen readers).
function showToast(text, kind = "error") {
  clearTimeout(toastTimer);
  announce(text);
  ui.toast.textContent = text;
  ui.toast.dataset.kind = kind;
  ui.toast.hidden = false;
  toastTimer = setTimeout(() => {
    ui.toast.hidden = true;
  }, 6000);
}

// A reader at the bottom stays there when the log shrinks (the composer grows, the keyboard opens).
let pinned = true;
ui.log.addEventListener("scroll", () => {
  pinned = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 48;
  // Scrolled down by keys while "New messages" has focus: it hides, the reader stays in the log.
  if (pinned) hideKeepingFocus(ui.jump, true);
});
new ResizeObserver(() => {
  if (pinned) ui.log.scrollTop = ui.log.scrollHeight;
}).observe(ui.log);

ui.jump.addEventListener("click", () => {
  ui.log.scrollTop = ui.log.scrollHeight;
  ui.jump.hidden = true;
  goOnTo().focus();
});

ui.loadEarlier.addEventListener("click", () => {
  const oldest = Number(ui.messages.firstElementChild?.dataset.seq ?? 0);
  if (state.loadingOlder || oldest <= 1) return;
  if (connection.send({ type: "history", before: oldest, limit: NEWEST_PAGE })) {
    state.loadingOlder = true;
  }
});

// --- start ---------------------------------------------------------------------------------------

for (const entry of outbox.entries) renderPending(entry);
updateComposer();
renderMembers();
connection.start();
