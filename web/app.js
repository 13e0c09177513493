/*
 * Wardroom web client: one file, no build step, no dependencies.
 *
 * It speaks protocol v1 (docs/protocol.md) over one WebSocket at /ws on the
 * host that served the page. The code is one IIFE in seven parts:
 *
 *   1. Helpers     DOM building (text nodes only: nothing a user wrote is
 *                  ever parsed as HTML), formatting, validation.
 *   2. State       connection, identity, rooms (messages by id, members),
 *                  pending sends by `ref`, review queue, cooldowns.
 *   3. Connection  connect, close-code handling, reconnect with capped
 *                  exponential backoff and jitter, catch-up after rejoin.
 *   4. Frames      one handler per server frame type.
 *   5. Rendering   rooms, message list (ordered by id), members, review
 *                  queue, banner, composer and its live limits.
 *   6. Actions     sending, history paging, reports, moderation dialogs.
 *   7. Wiring      event listeners and start-up from the URL
 *                  (?token=…, ?room=…, ?nick=…).
 */
(() => {
  'use strict';

  // ───────────────────────────── 1. Helpers ─────────────────────────────

  const $ = (id) => document.getElementById(id);

  /**
   * Creates an element. `props` sets attributes (`class`, `text`, `on*`
   * listeners, `dataset`); children are nodes or strings, and strings always
   * become text nodes.
   */
  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = String(value);
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const ICONS = {
    check: 'M5 12.5 10 17l9-10',
    clock: 'M12 7v5l3 2M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18Z',
    alert: 'M12 8v5M12 16.5v.5M10.3 3.9 2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0Z',
    hold: 'M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18ZM10 9v6M14 9v6',
    flag: 'M5 21V4M5 4h11l-2 4 2 4H5',
    trash: 'M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3',
    mute: 'M11 5 6 9H3v6h3l5 4V5ZM16 9l5 6M21 9l-5 6',
    kick: 'M15 3h4a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2h-4M10 17l-5-5 5-5M5 12h11',
    ban: 'M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18ZM5.6 5.6l12.8 12.8',
    more: 'M6 12h.01M12 12h.01M18 12h.01',
    x: 'M6 6l12 12M18 6 6 18',
  };

  function icon(name) {
    const svg = document.createElementNS(SVG_NS, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('focusable', 'false');
    svg.classList.add('icon');
    const path = document.createElementNS(SVG_NS, 'path');
    path.setAttribute('d', ICONS[name]);
    svg.append(path);
    return svg;
  }

  const encoder = new TextEncoder();
  const utf8Length = (text) => encoder.encode(text).length;
  const charLength = (text) => Array.from(text).length;
  const number = new Intl.NumberFormat();
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
  const dayTimeFormat = new Intl.DateTimeFormat(undefined, {
    weekday: 'short',
    day: 'numeric',
    month: 'short',
    hour: '2-digit',
    minute: '2-digit',
  });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });

  function formatTime(ts) {
    const date = new Date(ts);
    const today = new Date();
    return date.toDateString() === today.toDateString() ? timeFormat.format(date) : dayTimeFormat.format(date);
  }

  /** A countdown for people: "42 s", "4:05 min", "2 h 05 min". */
  function formatCountdown(ms) {
    const total = Math.max(0, Math.ceil(ms / 1000));
    if (total < 60) return `${total} s`;
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const seconds = total % 60;
    if (hours > 0) return `${hours} h ${String(minutes).padStart(2, '0')} min`;
    return `${minutes}:${String(seconds).padStart(2, '0')} min`;
  }

  /** A duration in seconds for people: "10 minutes", "1 hour". */
  function formatSeconds(seconds) {
    const units = [
      [86400, 'day'],
      [3600, 'hour'],
      [60, 'minute'],
      [1, 'second'],
    ];
    for (const [size, name] of units) {
      if (seconds >= size && seconds % size === 0) {
        const n = seconds / size;
        return `${n} ${name}${n === 1 ? '' : 's'}`;
      }
    }
    return `${seconds} seconds`;
  }

  // Naming rules from docs/protocol.md, checked before asking the server.
  const NICK_RE = /^[\p{L}\p{N}][\p{L}\p{N}_.-]*$/u;
  const ROOM_RE = /^#?[\p{L}\p{N}_.-]+$/u;

  function nickProblem(nick) {
    const n = charLength(nick);
    if (n < 2 || n > 24) return 'A nickname has 2 to 24 characters.';
    if (!NICK_RE.test(nick)) return 'Use letters, digits, _ - or . and start with a letter or digit.';
    return null;
  }

  function roomProblem(room) {
    if (!room) return 'Enter a room name.';
    if (charLength(room.replace(/^#/, '')) > 64) return 'A room name has at most 64 characters.';
    if (!ROOM_RE.test(room)) return 'Use letters, digits, _ - or . (an optional # in front).';
    return null;
  }

  const isStaffRoles = (roles) => Array.isArray(roles) && (roles.includes('moderator') || roles.includes('admin'));
  const pageId = Math.random().toString(36).slice(2, 8);
  let refCounter = 0;
  const newRef = (kind) => `${kind}-${pageId}-${++refCounter}`;

  // ───────────────────────────── 2. State ─────────────────────────────

  const params = new URLSearchParams(location.search);

  /** Everything the client knows; the DOM is rendered from it. */
  const state = {
    token: null, // a JWT from ?token= (kept in sessionStorage, removed from the address bar)
    nick: '', // the nickname asked for (guests)
    me: null, // `welcome.user`
    myIds: new Set(), // every user id this page has had (a guest gets a new one per connection)
    staff: false,
    limits: { max_message_bytes: 16384, max_frame_bytes: 16384, history_page_max: 200, max_rooms_per_connection: 20 },
    sizeRule: null, // a `size` filter's limit, learned from a `too_large` error: { limit, unit }
    ws: null,
    welcomed: false,
    everWelcomed: false,
    attempt: 0, // reconnect attempts since the last welcome
    retryAt: 0,
    retryTimer: 0,
    stopped: null, // { title, body, canRetry } once the server has removed us (no auto-reconnect)
    fatalError: null, // a `banned`/`unauthorized` error seen just before a close
    closeNotice: null, // what the banner says while reconnecting
    rooms: new Map(), // name → Room
    active: null, // name of the room on screen
    pending: new Map(), // ref → { ref, room, content, el } (sent, no ack/error/held yet)
    acked: new Map(), // "room#id" → pending entry acked before its message arrived
    lost: [], // entries whose connection dropped before their ack: { room, content, el }
    requests: new Map(), // ref → context of a join/history/moderation request
    review: new Map(), // key → review item (held, report, or flagged)
    mute: null, // { until (local clock), reason }
    reconnected: false, // this page has been welcomed before
    nickRetries: 0,
  };

  /** A room the client is in (or is joining). */
  function makeRoom(name) {
    return {
      name,
      list: h('ol', { class: 'message-list' }),
      messages: new Map(), // id → element
      deleted: new Set(),
      unclaimed: new Map(), // id → own message waiting for its ack
      held: new Map(), // review item id → placeholder element
      members: new Map(), // user id → user
      memberCount: 0,
      slowMode: 0,
      locked: false,
      slowUntil: 0,
      rateUntil: 0, // rate limits can be per room (a filter's `rooms`), so the wait is kept per room
      oldest: null,
      newest: 0,
      more: null, // older history exists: true/false, or null before we know
      loadingOlder: false,
      joined: false,
      resumeFrom: null, // the newest id seen before a reconnect
      unread: 0,
      scrollTop: null, // saved position (null: follow the newest)
    };
  }

  const activeRoom = () => (state.active ? state.rooms.get(state.active) : null);

  // ───────────────────────────── 3. Connection ─────────────────────────────

  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_CAP_MS = 30000;

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const query = new URLSearchParams();
    if (state.token) query.set('token', state.token);
    else if (state.nick) query.set('nick', state.nick);
    return `${scheme}//${location.host}/ws?${query}`;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = 0;
    state.retryAt = 0;
    state.fatalError = null;
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (error) {
      onClosed(1006, String(error && error.message ? error.message : error));
      return;
    }
    state.ws = ws;
    state.welcomed = false;
    state.nickRetries = 0;
    renderConnection();
    ws.addEventListener('message', (event) => {
      if (state.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame.type === 'string') handleFrame(frame);
    });
    ws.addEventListener('open', () => {
      // A server with `[auth] guests = false` says nothing to a client without a token.
      if (state.token) return;
      setTimeout(() => {
        if (state.ws !== ws || state.welcomed || ws.readyState !== WebSocket.OPEN) return;
        state.ws = null;
        ws.close(1000);
        stop({
          title: 'This server needs you to sign in.',
          body: 'Open Wardroom with the invitation link that carries your token (…/?token=…).',
          canRetry: false,
        });
      }, 5000);
    });
    ws.addEventListener('close', (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      onClosed(event.code, event.reason);
    });
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN || !state.welcomed) return false;
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a request whose answer (`done`, `history`, `joined`, `error`) carries its ref. */
  function request(frame, context) {
    const ref = newRef(context.kind.slice(0, 1));
    if (!send({ ...frame, ref })) {
      toast('Not connected. Try again once the connection is back.', 'error');
      return null;
    }
    state.requests.set(ref, context);
    return ref;
  }

  const REMOVAL_RE = /^(kicked|banned|you are banned)\b/i;

  function onClosed(code, reason) {
    const wasWelcomed = state.welcomed;
    state.welcomed = false;
    state.requests.clear();
    for (const entry of state.pending.values()) {
      markFailed(
        entry.el,
        'The connection dropped before the server confirmed this message. It may not have been delivered.',
      );
      state.lost.push({ room: entry.room, content: entry.content, el: entry.el });
    }
    state.pending.clear();
    state.acked.clear();
    for (const room of state.rooms.values()) {
      if (room.joined) room.resumeFrom = room.newest;
      room.joined = false;
      room.loadingOlder = false;
    }

    const fatal = state.fatalError;
    if (code === 1008 && (REMOVAL_RE.test(reason) || (fatal && fatal.code === 'banned'))) {
      // The `error` frame has the whole text; a close reason is cut at 123 bytes.
      const text = (fatal && fatal.message) || reason || '';
      const kicked = /^kicked/i.test(text);
      stop({
        title: kicked ? 'You were removed from the chat.' : 'You are banned from this chat.',
        body: describeRemoval(text),
        canRetry: kicked,
      });
      return;
    }
    if (fatal && fatal.code === 'unauthorized') {
      stop({ title: 'Sign-in failed.', body: fatal.message, canRetry: false });
      return;
    }
    if (state.stopped) return;

    if (code === 1001) {
      state.closeNotice = {
        title: 'The server is shutting down.',
        body: 'You will be reconnected when it is back.',
        shutdown: true,
      };
    } else if (!wasWelcomed && state.closeNotice && state.closeNotice.shutdown) {
      // Still down (connection refused, or 503 while it stops): keep saying why.
    } else if (code === 1008 || code === 1009) {
      state.closeNotice = { title: 'The server closed the connection.', body: reason ? `Reason: ${reason}.` : '' };
    } else {
      state.closeNotice = {
        title: state.everWelcomed ? 'Connection lost.' : 'Cannot reach the server.',
        body: 'Reconnecting automatically…',
      };
    }
    announce(state.closeNotice.title);
    scheduleReconnect();
  }

  /**
   * The close reason of a kick or ban, for people: "kicked: spam" → "Reason:
   * spam"; "banned for 1h: spam" → "For 1h. Reason: spam"; "you are banned
   * for 42 more seconds: spam" → "For another 42 s. Reason: spam".
   */
  function describeRemoval(text) {
    let match = /^kicked:\s*(.*)$/is.exec(text);
    if (match) return `Reason: ${match[1]}`;
    match = /^banned for (\S+):\s*(.*)$/is.exec(text);
    if (match) return `For ${match[1]}. Reason: ${match[2]}`;
    match = /^you are banned for (\d+) more seconds:\s*(.*)$/is.exec(text);
    if (match) return `For another ${formatCountdown(Number(match[1]) * 1000)}. Reason: ${match[2]}`;
    match = /^(?:you are banned for good|banned):\s*(.*)$/is.exec(text);
    if (match) return `Permanently. Reason: ${match[1]}`;
    return text;
  }

  /** The server removed us (kick, ban, refused token): no automatic reconnect. */
  function stop(notice) {
    clearTimeout(state.retryTimer);
    state.retryTimer = 0;
    state.stopped = notice;
    state.closeNotice = null;
    announce(`${notice.title} ${notice.body}`, 'assertive');
    renderAll();
  }

  function scheduleReconnect() {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2)); // "equal jitter"
    state.attempt += 1;
    state.retryAt = Date.now() + delay;
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(connect, delay);
    renderAll();
  }

  function reconnectNow() {
    state.stopped = null;
    state.attempt = 0;
    connect();
    renderAll();
  }

  /** After a rejoin: fetch what was missed between `from` and the joined history. */
  function catchUp(room, from, before) {
    const frame = { type: 'history', room: room.name, limit: state.limits.history_page_max };
    if (before !== null) frame.before = before; // null: the latest messages
    request(frame, { kind: 'catchup', room: room.name, from });
  }

  // ───────────────────────────── 4. Frames ─────────────────────────────

  const handlers = {
    welcome(frame) {
      const first = !state.everWelcomed;
      state.reconnected = !first;
      state.me = frame.user;
      state.myIds.add(frame.user.id);
      state.staff = isStaffRoles(frame.user.roles);
      state.limits = { ...state.limits, ...(frame.limits || {}) };
      state.welcomed = true;
      state.everWelcomed = true;
      state.attempt = 0;
      state.closeNotice = null;
      state.stopped = null;
      state.mute = null; // a mute in force follows as a `muted` frame
      // Moderators get the pending review queue after every welcome (as
      // `review` frames): drop the old copy, which may hold items decided
      // meanwhile. Flags exist only on the page; a moderator keeps those.
      removeReviewWhere((item) => !state.staff || item.kind !== 'flagged');
      showChat();
      const names = state.rooms.size ? [...state.rooms.keys()] : [];
      for (const name of names) sendJoin(name, false);
      if (!first) announce(`Reconnected as ${frame.user.nick}.`);
      renderAll();
      refreshMessageActions();
    },

    joined(frame) {
      const context = takeRequest(frame.ref);
      let room = state.rooms.get(frame.room);
      if (!room) {
        room = makeRoom(frame.room);
        state.rooms.set(frame.room, room);
      }
      room.joined = true;
      room.members = new Map((frame.members || []).map((user) => [user.id, user]));
      room.memberCount = frame.member_count ?? room.members.size;
      room.slowMode = frame.slow_mode || 0;
      room.locked = Boolean(frame.locked);
      const history = Array.isArray(frame.history) ? frame.history : [];
      addMessages(room, history, false);
      if (room.more === null) room.more = history.length > 0;
      const from = room.resumeFrom;
      room.resumeFrom = null;
      if (from !== null && !history.length) {
        catchUp(room, from, null); // `history_on_join = 0`: ask for what is new
      } else if (from !== null && history[0].id > from + 1) {
        catchUp(room, from, history[0].id);
      }
      if (!state.active || (context && context.focus)) switchRoom(room.name);
      else renderRooms();
      if (room.name === state.active) {
        renderRoomHeader();
        renderMembers();
        renderComposer();
        fillViewport(room);
      }
    },

    left(frame) {
      takeRequest(frame.ref);
      removeRoom(frame.room);
    },

    message(frame) {
      const room = state.rooms.get(frame.room);
      if (room) addMessage(room, frame, true);
    },

    ack(frame) {
      const entry = state.pending.get(frame.ref);
      if (!entry) return;
      state.pending.delete(frame.ref);
      const room = state.rooms.get(entry.room);
      if (!room) return;
      if (room.slowMode > 0 && !state.staff) room.slowUntil = Date.now() + room.slowMode * 1000;
      const message = room.unclaimed.get(frame.id);
      if (message) {
        room.unclaimed.delete(frame.id);
        confirmPending(room, entry, message);
      } else if (room.messages.has(frame.id)) {
        entry.el.remove(); // already shown (it waited too long for this ack)
      } else {
        state.acked.set(`${room.name}#${frame.id}`, entry);
        setState(entry.el, 'sent', 'Sent');
      }
      renderComposer();
    },

    history(frame) {
      const context = takeRequest(frame.ref);
      const room = state.rooms.get(frame.room);
      if (!room) return;
      const messages = Array.isArray(frame.messages) ? frame.messages : [];
      if (context && context.kind === 'catchup') {
        addMessages(room, messages, false);
        const oldest = messages.length ? messages[0].id : null;
        if (frame.more && oldest !== null && oldest > context.from + 1) {
          catchUp(room, context.from, oldest);
        } else {
          const missed = [...room.messages.keys()].filter((id) => id > context.from).length;
          if (missed) announce(`Caught up on #${room.name}.`);
        }
        return;
      }
      room.loadingOlder = false;
      room.more = Boolean(frame.more) && messages.length > 0;
      prependHistory(room, messages);
      if (room.name === state.active) {
        renderHistoryEdge();
        fillViewport(room);
      }
    },

    presence(frame) {
      const room = state.rooms.get(frame.room);
      if (!room || !frame.user) return;
      if (frame.event === 'join') {
        if (!room.members.has(frame.user.id)) room.memberCount += 1;
        room.members.set(frame.user.id, frame.user);
      } else if (frame.event === 'leave') {
        if (room.members.delete(frame.user.id) || room.memberCount > room.members.size) {
          room.memberCount = Math.max(room.members.size, room.memberCount - 1);
        }
      } else if (frame.event === 'nick') {
        room.members.set(frame.user.id, frame.user);
      }
      if (room.name === state.active) {
        renderMembers();
        renderRoomHeader();
      }
    },

    renamed(frame) {
      takeRequest(frame.ref);
      state.me = frame.user;
      state.nick = frame.user.nick;
      rememberNick(frame.user.nick);
      for (const room of state.rooms.values()) {
        if (room.members.has(frame.user.id)) room.members.set(frame.user.id, frame.user);
      }
      toast(`You are now ${frame.user.nick}.`, 'ok');
      if (bannerNotice && bannerNotice.nick) {
        bannerNotice = null;
        renderBanner();
      }
      renderMe();
      renderMembers();
    },

    held(frame) {
      const entry = state.pending.get(frame.ref);
      if (!entry) return;
      state.pending.delete(frame.ref);
      const room = state.rooms.get(entry.room);
      if (room) room.held.set(frame.id, entry.el);
      entry.el.dataset.item = String(frame.id);
      setState(entry.el, 'held', `Held for review: ${frame.reason}`, 'hold');
      announce(`Your message is waiting for a moderator: ${frame.reason}`);
    },

    error(frame) {
      const context = takeRequest(frame.ref);
      const entry = frame.ref !== undefined ? state.pending.get(frame.ref) : undefined;
      applyCooldown(frame, entry ? entry.room : state.active);
      if (frame.code === 'too_large') learnSizeRule(frame.message);
      if (entry) {
        state.pending.delete(frame.ref);
        markFailed(entry.el, describeRefusal(frame));
        announce(`Message not sent. ${describeRefusal(frame)}`, 'assertive');
        renderComposer();
        return;
      }
      if (context) {
        onRequestError(context, frame);
        return;
      }
      switch (frame.code) {
        case 'banned':
        case 'unauthorized':
          state.fatalError = { code: frame.code, message: frame.message };
          return;
        case 'nick_taken':
        case 'invalid_nick':
          onNickRefused(frame);
          return;
        case 'muted':
          renderComposer();
          return;
        default:
          toast(frame.message || `Error: ${frame.code}`, 'error');
      }
    },

    done(frame) {
      const context = takeRequest(frame.ref);
      toast(context && context.done ? context.done : `Done: ${frame.action}.`, 'ok');
    },

    deleted(frame) {
      const room = state.rooms.get(frame.room);
      if (!room) return;
      room.deleted.add(frame.id);
      const el = room.messages.get(frame.id);
      if (el) {
        el.dataset.state = 'deleted';
        el.replaceChildren(h('p', { class: 'msg-deleted' }, icon('trash'), 'This message was deleted by a moderator.'));
      }
      removeReviewWhere((item) => item.kind === 'flagged' && item.room === frame.room && item.message_id === frame.id);
    },

    muted(frame) {
      const remaining = Number(frame.remaining_ms) || Math.max(0, Number(frame.until) - Date.now());
      state.mute = { until: Date.now() + remaining, reason: frame.reason || '' };
      announce(`You are muted for ${formatCountdown(remaining)}. ${frame.reason || ''}`, 'assertive');
      renderComposer();
    },

    unmuted() {
      state.mute = null;
      announce('Your mute has ended. You can send messages again.');
      toast('You can send messages again.', 'ok');
      renderComposer();
    },

    warning(frame) {
      showBanner({
        kind: 'warning',
        title: 'Warning from the moderators.',
        body: frame.reason || '',
        dismissible: true,
      });
      announce(`Warning from the moderators: ${frame.reason || ''}`, 'assertive');
    },

    room(frame) {
      const room = state.rooms.get(frame.room);
      if (!room) return;
      const slowChanged = room.slowMode !== (frame.slow_mode || 0);
      const lockChanged = room.locked !== Boolean(frame.locked);
      room.slowMode = frame.slow_mode || 0;
      room.locked = Boolean(frame.locked);
      if (!room.slowMode) room.slowUntil = 0;
      if (slowChanged) {
        toast(
          room.slowMode
            ? `Slow mode in #${room.name}: one message every ${formatSeconds(room.slowMode)}.`
            : `Slow mode is off in #${room.name}.`,
        );
      }
      if (lockChanged) {
        toast(room.locked ? `#${room.name} is now read-only for members.` : `#${room.name} is open again.`);
      }
      if (room.name === state.active) {
        renderRoomHeader();
        renderComposer();
      }
    },

    review(frame) {
      if (!state.staff || !frame.item || frame.item.status !== 'pending') return;
      const item = frame.item;
      state.review.set(`item:${item.id}`, { ...item, key: `item:${item.id}` });
      renderReview();
      announce(item.kind === 'report' ? `New report in #${item.room}.` : `A message in #${item.room} awaits review.`);
    },

    reviewed(frame) {
      if (state.review.delete(`item:${frame.id}`)) renderReview();
      for (const room of state.rooms.values()) {
        const el = room.held.get(frame.id);
        if (!el) continue;
        room.held.delete(frame.id);
        if (frame.status === 'approved') {
          el.remove();
          announce('A moderator approved your message; it is now in the room.');
        } else {
          setState(el, 'denied', 'A moderator did not approve this message.', 'ban');
          addDismiss(el);
          announce('A moderator did not approve your held message.');
        }
      }
    },

    flagged(frame) {
      if (!state.staff) return;
      const key = `flag:${frame.room}#${frame.id}`;
      state.review.set(key, {
        key,
        kind: 'flagged',
        room: frame.room,
        message_id: frame.id,
        user_id: frame.user && frame.user.id,
        nick: frame.user && frame.user.nick,
        content: frame.content,
        reason: frame.reason,
        filter: frame.filter,
        ts: Date.now(),
      });
      renderReview();
    },
  };

  function handleFrame(frame) {
    const handler = handlers[frame.type];
    if (handler) handler(frame);
  }

  function takeRequest(ref) {
    if (ref === undefined || ref === null) return undefined;
    const context = state.requests.get(ref);
    state.requests.delete(ref);
    return context;
  }

  function onRequestError(context, frame) {
    switch (context.kind) {
      case 'join': {
        const room = state.rooms.get(context.room);
        if (room && !room.joined && room.messages.size === 0) removeRoom(context.room);
        showFieldError('join-room', frame.message);
        toast(`Cannot join #${context.room}: ${frame.message}`, 'error');
        break;
      }
      case 'older': {
        const room = state.rooms.get(context.room);
        if (room) room.loadingOlder = false;
        renderHistoryEdge();
        toast(`Cannot load older messages: ${frame.message}`, 'error');
        break;
      }
      case 'catchup':
        toast(`Some missed messages could not be loaded: ${frame.message}`, 'error');
        break;
      case 'nick':
        if (context.retry) onNickRefused(frame);
        else toast(`Cannot change your nickname: ${frame.message}`, 'error');
        break;
      case 'review':
        // Someone else decided it first (or it is gone): drop it from the queue.
        if (frame.code === 'not_found' || frame.code === 'bad_request') {
          state.review.delete(context.key);
          renderReview();
        }
        toast(frame.message, 'error');
        break;
      default:
        toast(`${context.label || 'Request'} failed: ${frame.message}`, 'error');
    }
  }

  // After a reconnect, the server may not have noticed yet that our old
  // connection is gone (at worst until its idle timeout): ask again later.
  const NICK_RETRY_MS = [2000, 5000, 15000, 40000, 80000];

  function onNickRefused(frame) {
    const wanted = state.nick;
    const current = state.me ? state.me.nick : '';
    const retry = NICK_RETRY_MS[state.nickRetries];
    if (frame.code === 'nick_taken' && state.reconnected && wanted && current !== wanted && retry !== undefined) {
      state.nickRetries += 1;
      const ws = state.ws;
      setTimeout(() => {
        if (state.ws === ws && state.welcomed && state.me && state.me.nick !== wanted) {
          request({ type: 'nick', nick: wanted }, { kind: 'nick', label: 'Nickname change', retry: true });
        }
      }, retry);
      showBanner({
        kind: 'info',
        title: `Your nickname “${wanted}” is still held by your previous connection.`,
        body: `You are ${current} for now; Wardroom will ask for it again in a few seconds.`,
        dismissible: true,
        nick: true,
      });
      return;
    }
    showBanner({
      kind: 'info',
      title: `The nickname “${wanted}” cannot be used.`,
      body: `${frame.message}. You are chatting as ${current}.`,
      action: { label: 'Change nickname', run: changeNick },
      dismissible: true,
      nick: true,
    });
  }

  /** Rate limits, slow mode and mutes come with a wait: start its countdown. */
  function applyCooldown(frame, roomName) {
    const wait = Number(frame.retry_after_ms);
    if (!(wait > 0)) return;
    if (frame.code === 'muted') {
      const reason = String(frame.message || '').replace(/^you are muted for \d+ more seconds:\s*/i, '');
      state.mute = { until: Date.now() + wait, reason };
    } else {
      const room = state.rooms.get(roomName);
      if (!room) return;
      if (frame.code === 'slow_mode') room.slowUntil = Date.now() + wait;
      else room.rateUntil = Date.now() + wait;
    }
    renderComposer();
  }

  /** `too_large` from a `size` filter names its limit: remember it for the counter. */
  function learnSizeRule(message) {
    const match = /(characters|bytes); the limit is ([\d,]+)/.exec(String(message || ''));
    if (match) state.sizeRule = { unit: match[1], limit: Number(match[2].replace(/,/g, '')) };
    renderComposer();
  }

  const REFUSALS = {
    rate_limited: 'Too fast',
    slow_mode: 'Slow mode',
    muted: 'You are muted',
    too_large: 'Too long',
    profanity: 'Blocked word',
    room_locked: 'Room is read-only',
    link_not_allowed: 'Link not allowed',
    repeated: 'Repeated message',
    mention_flood: 'Too many mentions',
    policy_violation: 'Against the rules',
    not_member: 'Not in the room',
  };

  function describeRefusal(frame) {
    const label = REFUSALS[frame.code] || 'Refused';
    return `${label}: ${frame.message || frame.code}`;
  }

  // ───────────────────────────── 5. Rendering ─────────────────────────────

  const scroller = $('scroller');
  const composerInput = $('composer-input');

  function renderAll() {
    renderConnection();
    renderMe();
    renderRooms();
    renderRoomHeader();
    renderHistoryEdge();
    renderMembers();
    renderReview();
    renderComposer();
    renderBanner();
  }

  function showChat() {
    $('login').hidden = true;
    $('chat').hidden = false;
    $('conn').hidden = false;
    $('toggle-rooms').hidden = false;
    $('toggle-side').hidden = false;
  }

  function renderConnection() {
    const conn = $('conn');
    const label = $('conn-label');
    const now = $('reconnect-now');
    let stateName;
    let text;
    if (state.stopped) {
      stateName = 'stopped';
      text = 'Disconnected';
    } else if (state.welcomed) {
      stateName = 'online';
      text = 'Connected';
    } else if (state.retryAt) {
      stateName = 'waiting';
      text = `Reconnecting in ${formatCountdown(state.retryAt - Date.now())}`;
    } else {
      stateName = 'connecting';
      text = 'Connecting…';
    }
    conn.dataset.state = stateName;
    if (label.textContent !== text) label.textContent = text;
    now.hidden = stateName !== 'waiting';
  }

  function renderMe() {
    const me = state.me;
    $('me').hidden = !me;
    if (!me) return;
    $('me-nick').textContent = me.nick;
    const role = (me.roles || []).includes('admin') ? 'admin' : state.staff ? 'moderator' : '';
    $('me-role').hidden = !role;
    $('me-role').textContent = role;
    $('change-nick').hidden = Boolean(state.token);
  }

  function renderRooms() {
    const list = $('room-list');
    const items = [...state.rooms.values()].map((room) => {
      const current = room.name === state.active;
      return h(
        'li',
        { class: 'room-item' },
        h(
          'button',
          {
            type: 'button',
            class: 'room-btn',
            'aria-current': current ? 'page' : null,
            onclick: () => switchRoom(room.name),
          },
          h('span', { class: 'room-hash', 'aria-hidden': 'true' }, '#'),
          h('span', { class: 'room-name' }, room.name.replace(/^#/, '')),
          room.joined ? null : h('span', { class: 'room-status' }, state.welcomed ? '(joining…)' : '(offline)'),
          room.unread
            ? h('span', { class: 'count-badge', 'aria-label': `${room.unread} unread` }, String(room.unread))
            : null,
        ),
        h(
          'button',
          {
            type: 'button',
            class: 'icon-btn btn-sm room-leave',
            'aria-label': `Leave #${room.name}`,
            title: `Leave #${room.name}`,
            onclick: () => leaveRoom(room.name),
          },
          icon('x'),
        ),
      );
    });
    list.replaceChildren(...items);
  }

  function renderRoomHeader() {
    const room = activeRoom();
    $('room-title').textContent = room ? `#${room.name.replace(/^#/, '')}` : 'No room';
    const meta = $('room-meta');
    if (!room) {
      meta.textContent = 'Join a room to start chatting.';
    } else if (!room.joined) {
      meta.textContent = state.welcomed ? 'Joining…' : state.stopped ? 'Disconnected' : 'Waiting for the connection…';
    } else {
      const n = room.memberCount;
      meta.textContent = `${number.format(n)} ${n === 1 ? 'member' : 'members'} here`;
    }
    const flags = [];
    if (room && room.slowMode)
      flags.push(h('span', { class: 'flag flag-slow' }, icon('clock'), `Slow mode · ${formatSeconds(room.slowMode)}`));
    if (room && room.locked) flags.push(h('span', { class: 'flag flag-locked' }, icon('hold'), 'Read-only'));
    $('room-flags').replaceChildren(...flags);
    $('room-tools').hidden = !(state.staff && room && room.joined);
    if (room) {
      $('lock-btn').textContent = room.locked ? 'Unlock room' : 'Lock room';
      $('slow-btn').textContent = room.slowMode ? `Slow mode: ${formatSeconds(room.slowMode)}` : 'Slow mode…';
    }
    $('composer-label').textContent = room ? `Message #${room.name}` : 'Message';
  }

  function renderHistoryEdge() {
    const room = activeRoom();
    const button = $('load-older');
    const start = $('history-start');
    $('empty-room').hidden = !(room && room.joined && room.messages.size === 0 && room.list.children.length === 0);
    if (!room || room.messages.size === 0) {
      button.hidden = true;
      start.hidden = true;
      return;
    }
    button.hidden = room.more === false;
    button.disabled = room.loadingOlder;
    button.textContent = room.loadingOlder ? 'Loading older messages…' : 'Load older messages';
    start.hidden = room.more !== false;
    start.textContent = `This is the beginning of #${room.name.replace(/^#/, '')}.`;
  }

  // Message list. Each item has a sort key: its id, or, for a message of
  // ours not yet confirmed, the newest id seen when it was sent plus ½.

  function sortKey(el) {
    return Number(el.dataset.sort);
  }

  function place(room, el) {
    const key = sortKey(el);
    let before = null;
    for (let node = room.list.lastElementChild; node; node = node.previousElementSibling) {
      if (sortKey(node) > key) before = node;
      else break;
    }
    room.list.insertBefore(el, before);
  }

  function nearBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  }

  function scrollToBottom() {
    scroller.scrollTop = scroller.scrollHeight;
    $('jump-new').hidden = true;
  }

  function isOwn(message) {
    return state.myIds.has(message.user);
  }

  function hasUnresolvedPending(room) {
    for (const entry of state.pending.values()) if (entry.room === room.name) return true;
    return false;
  }

  /** Adds one message (deduplicated by id). Own live messages wait for their ack. */
  function addMessage(room, message, live) {
    if (!message || typeof message.id !== 'number') return;
    if (room.messages.has(message.id) || room.deleted.has(message.id) || room.unclaimed.has(message.id)) return;
    if (isOwn(message)) {
      const acked = state.acked.get(`${room.name}#${message.id}`);
      if (acked) {
        state.acked.delete(`${room.name}#${message.id}`);
        confirmPending(room, acked, message);
        return;
      }
      forgetLost(room, message);
      forgetHeld(room, message);
      if (live && hasUnresolvedPending(room)) {
        room.unclaimed.set(message.id, message);
        setTimeout(() => {
          if (room.unclaimed.delete(message.id)) showMessage(room, message, live);
        }, 5000);
        return;
      }
    }
    showMessage(room, message, live);
  }

  function addMessages(room, messages, live) {
    const onScreen = room.name === state.active;
    const follow = onScreen && (room.scrollTop === null || nearBottom());
    for (const message of messages) addMessage(room, message, live);
    if (onScreen) {
      renderHistoryEdge();
      if (follow) scrollToBottom();
    }
  }

  function showMessage(room, message, live) {
    const onScreen = room.name === state.active;
    const follow = onScreen && nearBottom();
    const el = renderMessage(message);
    place(room, el);
    room.messages.set(message.id, el);
    room.newest = Math.max(room.newest, message.id);
    room.oldest = room.oldest === null ? message.id : Math.min(room.oldest, message.id);
    if (!live) return;
    if (!onScreen) {
      room.unread += 1;
      renderRooms();
    } else if (follow || isOwn(message)) {
      scrollToBottom();
    } else {
      $('jump-new').hidden = false;
    }
    if (onScreen) renderHistoryEdge();
  }

  /** Older messages go on top, keeping what the reader looks at in place. */
  function prependHistory(room, messages) {
    const onScreen = room.name === state.active;
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    const fresh = messages.filter(
      (m) => m && typeof m.id === 'number' && !room.messages.has(m.id) && !room.deleted.has(m.id),
    );
    const allOlder = room.oldest === null || fresh.every((m) => m.id < room.oldest);
    if (allOlder) {
      const fragment = document.createDocumentFragment();
      for (const message of fresh) {
        const el = renderMessage(message);
        fragment.append(el);
        room.messages.set(message.id, el);
        room.newest = Math.max(room.newest, message.id);
        room.oldest = room.oldest === null ? message.id : Math.min(room.oldest, message.id);
      }
      room.list.prepend(fragment);
    } else {
      for (const message of fresh) addMessage(room, message, false);
    }
    if (onScreen) scroller.scrollTop = scroller.scrollHeight - fromBottom;
  }

  function renderMessage(message) {
    const own = isOwn(message);
    const el = h(
      'li',
      {
        class: own ? 'msg own' : 'msg',
        dataset: { id: String(message.id), sort: String(message.id), state: own ? 'sent' : 'delivered' },
      },
      h(
        'div',
        { class: 'msg-head' },
        h('span', { class: 'msg-author' }, message.from || 'unknown'),
        own ? h('span', { class: 'msg-you' }, '(you)') : null,
        h(
          'time',
          {
            class: 'msg-time',
            datetime: new Date(message.ts).toISOString(),
            title: fullFormat.format(new Date(message.ts)),
          },
          formatTime(message.ts),
        ),
        own ? h('span', { class: 'msg-state' }, icon('check'), h('span', {}, 'Sent')) : null,
      ),
      h('p', { class: 'msg-text' }, String(message.content ?? '')),
      messageActions(message, own),
    );
    el.wardroomMessage = message;
    return el;
  }

  /** A local item for a message we sent and the server has not confirmed. */
  function renderLocal(room, content) {
    const after = room.newest + 0.5;
    const el = h(
      'li',
      { class: 'msg own', dataset: { sort: String(after), state: 'pending' } },
      h(
        'div',
        { class: 'msg-head' },
        h('span', { class: 'msg-author' }, state.me ? state.me.nick : 'you'),
        h('span', { class: 'msg-you' }, '(you)'),
        h('span', { class: 'msg-state' }, icon('clock'), h('span', {}, 'Sending…')),
      ),
      h('p', { class: 'msg-text' }, content),
    );
    el.wardroomContent = content;
    return el;
  }

  function setState(el, name, text, iconName) {
    el.dataset.state = name;
    const status = el.querySelector('.msg-state');
    if (status) status.replaceChildren(icon(iconName || (name === 'sent' ? 'check' : 'alert')), h('span', {}, text));
  }

  function markFailed(el, reason) {
    setState(el, 'failed', `Not sent. ${reason}`, 'alert');
    if (el.querySelector('.msg-fix')) return;
    const content = el.wardroomContent || '';
    el.append(
      h(
        'div',
        { class: 'msg-fix' },
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-ghost btn-sm',
            onclick: () => {
              composerInput.value = content;
              removeLost(el);
              el.remove();
              renderComposer();
              composerInput.focus();
            },
          },
          'Edit and resend',
        ),
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-ghost btn-sm',
            onclick: () => {
              removeLost(el);
              el.remove();
            },
          },
          'Dismiss',
        ),
      ),
    );
  }

  function addDismiss(el) {
    el.append(
      h(
        'div',
        { class: 'msg-fix' },
        h('button', { type: 'button', class: 'btn btn-ghost btn-sm', onclick: () => el.remove() }, 'Dismiss'),
      ),
    );
  }

  function removeLost(el) {
    state.lost = state.lost.filter((lost) => lost.el !== el);
  }

  /** A message we thought lost in a dropped connection came back in catch-up: it was delivered. */
  function forgetLost(room, message) {
    const index = state.lost.findIndex((lost) => lost.room === room.name && lost.content === message.content);
    if (index >= 0) {
      state.lost[index].el.remove();
      state.lost.splice(index, 1);
    }
  }

  /**
   * An approved held message of ours arrived. Usually `reviewed` says so
   * too, but a guest who reconnected (a new user id) is not told: the
   * message itself is the news.
   */
  function forgetHeld(room, message) {
    for (const [item, el] of room.held) {
      if (el.wardroomContent === message.content) {
        el.remove();
        room.held.delete(item);
        announce('A moderator approved your message; it is now in the room.');
        return;
      }
    }
  }

  function confirmPending(room, entry, message) {
    const follow = room.name === state.active && nearBottom();
    entry.el.remove();
    showMessage(room, message, false);
    const el = room.messages.get(message.id);
    if (el && message.content !== entry.content) {
      // A filter changed it on the way (masked words): say so to the sender.
      el.querySelector('.msg-text').after(
        h(
          'p',
          { class: 'msg-note' },
          icon('alert'),
          'The filters changed this message before delivering it (masked words).',
        ),
      );
    }
    if (follow) scrollToBottom();
  }

  function messageActions(message, own) {
    const who = message.from || 'this user';
    const buttons = [];
    if (state.staff) {
      buttons.push(actionButton('trash', 'Delete', `Delete message from ${who}`, () => moderateDelete(message)));
      if (!own) {
        buttons.push(actionButton('mute', 'Mute', `Mute ${who}`, () => moderateMute(message.user, who)));
        buttons.push(actionButton('kick', 'Kick', `Kick ${who}`, () => moderateKick(message.user, who)));
        buttons.push(actionButton('ban', 'Ban', `Ban ${who}`, () => moderateBan(message.user, who)));
      }
    } else if (!own) {
      buttons.push(actionButton('flag', 'Report', `Report message from ${who}`, () => reportMessage(message)));
    }
    if (!buttons.length) return null;
    return h(
      'div',
      { class: 'msg-actions', role: 'group', 'aria-label': `Actions for the message from ${who}` },
      buttons,
    );
  }

  function actionButton(iconName, text, label, run) {
    return h(
      'button',
      { type: 'button', class: 'act', 'aria-label': label, title: label, onclick: run },
      icon(iconName),
      h('span', {}, text),
    );
  }

  /** Roles can change on reconnect: rebuild every message's controls. */
  function refreshMessageActions() {
    for (const room of state.rooms.values()) {
      for (const el of room.messages.values()) {
        const message = el.wardroomMessage;
        if (!message || el.dataset.state === 'deleted') continue;
        const old = el.querySelector('.msg-actions');
        const fresh = messageActions(message, isOwn(message));
        if (old && fresh) old.replaceWith(fresh);
        else if (old) old.remove();
        else if (fresh) el.append(fresh);
      }
    }
  }

  function renderMembers() {
    const room = activeRoom();
    const list = $('member-list');
    const more = $('member-more');
    $('member-count').hidden = !room || !room.joined;
    if (!room || !room.joined) {
      list.replaceChildren();
      $('member-count').textContent = '';
      more.hidden = !room;
      more.textContent = 'Who is here shows once you are connected.';
      return;
    }
    const members = [...room.members.values()].sort((a, b) => {
      const staff = Number(isStaffRoles(b.roles)) - Number(isStaffRoles(a.roles));
      return staff || a.nick.localeCompare(b.nick);
    });
    list.replaceChildren(...members.map(renderMember));
    $('member-count').textContent = number.format(room.memberCount);
    const hidden = room.memberCount - members.length;
    more.hidden = hidden <= 0;
    more.textContent = hidden > 0 ? `and ${number.format(hidden)} more (large rooms list only some members)` : '';
  }

  function renderMember(user) {
    const self = state.me && user.id === state.me.id;
    const role = (user.roles || []).includes('admin') ? 'admin' : isStaffRoles(user.roles) ? 'moderator' : '';
    const li = h(
      'li',
      { class: 'member' },
      h('span', { class: 'presence-dot', 'aria-hidden': 'true' }),
      h('span', { class: 'member-nick' }, user.nick),
      self ? h('span', { class: 'msg-you' }, '(you)') : null,
      role ? h('span', { class: 'role-badge' }, role) : null,
    );
    if (state.staff && !self) {
      const menu = h(
        'details',
        { class: 'menu' },
        h(
          'summary',
          { class: 'icon-btn btn-sm', 'aria-label': `Moderate ${user.nick}`, title: `Moderate ${user.nick}` },
          icon('more'),
        ),
        h(
          'div',
          { class: 'menu-pop', role: 'group', 'aria-label': `Moderate ${user.nick}` },
          menuItem('mute', 'Mute…', () => moderateMute(user.id, user.nick)),
          menuItem('check', 'Unmute', () => moderateUnmute(user.id, user.nick)),
          menuItem('kick', 'Kick…', () => moderateKick(user.id, user.nick)),
          menuItem('ban', 'Ban…', () => moderateBan(user.id, user.nick)),
        ),
      );
      li.append(menu);
    }
    return li;
  }

  function menuItem(iconName, text, run) {
    return h(
      'button',
      {
        type: 'button',
        class: 'menu-item',
        onclick: (event) => {
          const details = event.currentTarget.closest('details');
          if (details) details.open = false;
          run();
        },
      },
      icon(iconName),
      text,
    );
  }

  function renderReview() {
    const panel = $('review-panel');
    panel.hidden = !state.staff;
    const count = state.review.size;
    const badge = $('review-count');
    badge.hidden = count === 0;
    badge.textContent = String(count);
    const sideBadge = $('side-badge');
    sideBadge.hidden = !(state.staff && count > 0);
    sideBadge.textContent = String(count);
    sideBadge.setAttribute('aria-label', `${count} to review`);
    if (!state.staff) {
      $('review-list').replaceChildren();
      return;
    }
    $('review-empty').hidden = count > 0;
    const items = [...state.review.values()].sort((a, b) => (a.created_at || a.ts) - (b.created_at || b.ts));
    $('review-list').replaceChildren(...items.map(renderReviewItem));
  }

  const KIND_LABELS = { held: 'Held', report: 'Report', flagged: 'Flagged' };

  function renderReviewItem(item) {
    const actions = [];
    if (item.kind === 'flagged') {
      actions.push(
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-danger btn-sm',
            onclick: () => moderateDelete({ room: item.room, id: item.message_id, from: item.nick }),
          },
          'Delete message',
        ),
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-secondary btn-sm',
            onclick: () => {
              state.review.delete(item.key);
              renderReview();
            },
          },
          'Dismiss',
        ),
      );
    } else {
      const report = item.kind === 'report';
      actions.push(
        h(
          'button',
          {
            type: 'button',
            class: report ? 'btn btn-danger btn-sm' : 'btn btn-primary btn-sm',
            onclick: () => decide(item, 'approve'),
          },
          report ? 'Uphold (delete)' : 'Approve',
        ),
        h(
          'button',
          { type: 'button', class: 'btn btn-secondary btn-sm', onclick: () => decide(item, 'deny') },
          report ? 'Dismiss' : 'Deny',
        ),
      );
    }
    const why =
      item.kind === 'held'
        ? `Held by ${item.filter || 'a filter'}: ${item.reason}`
        : item.kind === 'report'
          ? `Reported: ${item.reason}`
          : `Flagged by ${item.filter || 'a filter'}: ${item.reason}`;
    return h(
      'li',
      { class: 'review-item', dataset: { kind: item.kind } },
      h(
        'div',
        { class: 'review-head' },
        h('span', { class: `kind-badge kind-${item.kind}` }, KIND_LABELS[item.kind] || item.kind),
        h('span', { class: 'review-room' }, `#${item.room}`),
        item.ts
          ? h('time', { class: 'msg-time', datetime: new Date(item.ts).toISOString() }, formatTime(item.ts))
          : null,
      ),
      h(
        'p',
        { class: 'review-content' },
        h('span', { class: 'msg-author' }, item.nick || 'unknown'),
        ' ',
        h('span', { class: 'review-text' }, item.content || ''),
      ),
      h('p', { class: 'review-reason' }, why),
      h('div', { class: 'review-actions' }, actions),
    );
  }

  function removeReviewWhere(test) {
    let changed = false;
    for (const [key, item] of state.review) {
      if (test(item)) {
        state.review.delete(key);
        changed = true;
      }
    }
    if (changed) renderReview();
  }

  // Banner: connection trouble, removal, warnings, nickname problems.

  let bannerNotice = null; // a dismissible notice (warning, nickname)

  function showBanner(notice) {
    bannerNotice = notice;
    renderBanner();
  }

  function renderBanner() {
    let notice = null;
    if (state.stopped) {
      notice = {
        kind: 'error',
        title: state.stopped.title,
        body: state.stopped.body,
        action: state.stopped.canRetry ? { label: 'Connect again', run: reconnectNow } : null,
        role: 'alert',
      };
    } else if (!state.welcomed && state.closeNotice) {
      notice = { kind: 'warning', title: state.closeNotice.title, body: state.closeNotice.body, role: 'alert' };
    } else if (bannerNotice) {
      notice = bannerNotice;
    }
    const banner = $('banner');
    banner.hidden = !notice;
    if (!notice) return;
    banner.dataset.kind = notice.kind;
    banner.setAttribute('role', notice.role || 'status');
    $('banner-title').textContent = notice.title;
    $('banner-body').textContent = notice.body || '';
    const action = $('banner-action');
    action.hidden = !notice.action;
    action.textContent = notice.action ? notice.action.label : '';
    action.onclick = notice.action ? notice.action.run : null;
    $('banner-close').hidden = !notice.dismissible;
  }

  // Composer: why sending is blocked (if it is), and the size counter.

  function frameOverhead(room) {
    return utf8Length(
      JSON.stringify({ type: 'message', room: room ? room.name : '', content: '', ref: newRefPreview() }),
    );
  }

  const newRefPreview = () => `m-${pageId}-${refCounter + 1000000}`;

  /** Size of the message as the server will count it. */
  function measure(content, room) {
    const limit = Math.min(state.limits.max_message_bytes, state.limits.max_frame_bytes);
    const contentBytes = utf8Length(JSON.stringify(content)) - 2;
    const budget = Math.max(0, limit - frameOverhead(room));
    const chars = charLength(content);
    const rawBytes = utf8Length(content);
    let over =
      contentBytes > budget
        ? `${number.format(contentBytes - budget)} bytes too long (the server accepts ${number.format(limit)} bytes per message)`
        : null;
    const rule = state.sizeRule;
    if (!over && rule) {
      const size = rule.unit === 'characters' ? chars : rawBytes;
      if (size > rule.limit)
        over = `${number.format(size - rule.limit)} ${rule.unit} too long (the limit is ${number.format(rule.limit)} ${rule.unit})`;
    }
    return { contentBytes, budget, chars, over };
  }

  /** Why the active room cannot take a message right now, if it cannot. */
  function blocker(room) {
    const now = Date.now();
    if (state.stopped) return { kind: 'offline', text: state.stopped.title };
    if (!state.welcomed) {
      return {
        kind: 'offline',
        text: state.everWelcomed
          ? 'You are offline. Messages can be sent once the connection is back.'
          : 'Connecting to the server…',
      };
    }
    if (!room) return { kind: 'offline', text: 'Join a room to send messages.' };
    if (!room.joined) return { kind: 'offline', text: `Joining #${room.name}…` };
    if (state.mute && state.mute.until > now) {
      const reason = state.mute.reason ? ` Reason: ${state.mute.reason}` : '';
      return {
        kind: 'muted',
        text: `You are muted. You can send again in ${formatCountdown(state.mute.until - now)}.${reason}`,
      };
    }
    if (room.locked && !state.staff)
      return { kind: 'locked', text: `#${room.name} is read-only: moderators have locked it.` };
    if (room.rateUntil > now) {
      return {
        kind: 'rate',
        text: `You are sending messages too fast. You can send again in ${formatCountdown(room.rateUntil - now)}.`,
      };
    }
    if (room.slowUntil > now && !state.staff) {
      return {
        kind: 'slow',
        text: `Slow mode: one message every ${formatSeconds(room.slowMode || 1)}. You can send again in ${formatCountdown(room.slowUntil - now)}.`,
      };
    }
    return null;
  }

  let lastBlockKind = null;

  function renderComposer() {
    const room = activeRoom();
    const block = blocker(room);
    const content = composerInput.value;
    const size = measure(content, room);
    const notice = $('composer-notice');
    const text = block ? block.text : size.over ? `Too long: ${size.over}.` : '';
    notice.hidden = !text;
    notice.dataset.kind = block ? block.kind : size.over ? 'too-long' : '';
    if (notice.textContent !== text) notice.textContent = text;
    if (block && block.kind !== lastBlockKind && ['muted', 'rate', 'slow', 'locked'].includes(block.kind))
      announce(block.text);
    lastBlockKind = block ? block.kind : null;

    composerInput.disabled = Boolean(state.stopped) || !room;
    $('send-btn').disabled = Boolean(block) || Boolean(size.over) || !content.trim();
    const counter = $('composer-counter');
    counter.dataset.level = size.over ? 'over' : size.contentBytes > size.budget * 0.9 ? 'near' : '';
    const rule = state.sizeRule;
    const chars =
      rule && rule.unit === 'characters'
        ? `${number.format(size.chars)} / ${number.format(rule.limit)} characters`
        : `${number.format(size.chars)} ${size.chars === 1 ? 'character' : 'characters'}`;
    counter.textContent = `${chars} · ${number.format(size.contentBytes)} / ${number.format(size.budget)} bytes`;
    counter.title = `The server accepts up to ${number.format(Math.min(state.limits.max_message_bytes, state.limits.max_frame_bytes))} bytes per message, its envelope included.`;
  }

  function autosize() {
    composerInput.style.height = 'auto';
    composerInput.style.height = `${Math.min(composerInput.scrollHeight, 200)}px`;
  }

  // Status messages: visible toasts in an aria-live region.

  function toast(text, kind = 'info') {
    const box = $('toasts');
    const el = h('div', { class: `toast toast-${kind}` }, text);
    box.append(el);
    while (box.children.length > 3) box.firstElementChild.remove();
    setTimeout(() => el.remove(), 4500);
  }

  const liveRegions = {};

  /** Tells screen readers (only) about something that happened. */
  function announce(text, politeness = 'polite') {
    let region = liveRegions[politeness];
    if (!region) {
      region = h('div', {
        class: 'sr-only',
        'aria-live': politeness,
        role: politeness === 'assertive' ? 'alert' : 'status',
      });
      document.body.append(region);
      liveRegions[politeness] = region;
    }
    region.textContent = '';
    setTimeout(() => {
      region.textContent = text;
    }, 50);
  }

  function showFieldError(id, message) {
    const input = $(id);
    const error = $(`${id}-error`);
    if (!input || !error) return;
    error.hidden = !message;
    error.textContent = message || '';
    if (message) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }

  // ───────────────────────────── 6. Actions ─────────────────────────────

  function sendJoin(name, focus) {
    request({ type: 'join', room: name }, { kind: 'join', room: name, focus });
  }

  function joinRoom(name, focus = true) {
    let room = state.rooms.get(name);
    if (room && room.joined) {
      switchRoom(name);
      return;
    }
    if (!room) {
      if (state.rooms.size >= state.limits.max_rooms_per_connection) {
        showFieldError('join-room', `You can be in at most ${state.limits.max_rooms_per_connection} rooms at once.`);
        return;
      }
      room = makeRoom(name);
      state.rooms.set(name, room);
    }
    if (state.welcomed) sendJoin(name, focus);
    switchRoom(name);
  }

  function leaveRoom(name) {
    const room = state.rooms.get(name);
    if (!room) return;
    if (room.joined && state.welcomed) {
      request({ type: 'leave', room: name }, { kind: 'leave', room: name, label: `Leaving #${name}` });
    } else {
      removeRoom(name);
    }
  }

  function removeRoom(name) {
    if (!state.rooms.delete(name)) return;
    for (const [ref, entry] of state.pending) if (entry.room === name) state.pending.delete(ref);
    if (state.active === name) {
      state.active = null;
      const next = state.rooms.keys().next();
      if (!next.done) {
        switchRoom(next.value);
        return;
      }
      $('list-slot').replaceChildren();
    }
    renderAll();
  }

  function switchRoom(name) {
    const room = state.rooms.get(name);
    if (!room) return;
    const previous = activeRoom();
    if (previous && previous !== room) previous.scrollTop = nearBottom() ? null : scroller.scrollTop;
    state.active = name;
    room.unread = 0;
    $('list-slot').replaceChildren(room.list);
    $('jump-new').hidden = true;
    if (room.scrollTop === null) scrollToBottom();
    else scroller.scrollTop = room.scrollTop;
    document.body.classList.remove('rooms-open');
    $('toggle-rooms').setAttribute('aria-expanded', 'false');
    renderAll();
    fillViewport(room);
  }

  function loadOlder(room) {
    if (!room || !room.joined || room.loadingOlder || room.more === false || room.oldest === null) return;
    const ref = request(
      { type: 'history', room: room.name, before: room.oldest, limit: 50 },
      { kind: 'older', room: room.name },
    );
    if (!ref) return;
    room.loadingOlder = true;
    renderHistoryEdge();
  }

  /** When the messages do not fill the view, there is nothing to scroll: fetch older ones. */
  function fillViewport(room) {
    if (room.name !== state.active || room.more !== true) return;
    requestAnimationFrame(() => {
      if (scroller.scrollHeight <= scroller.clientHeight + 40) loadOlder(room);
    });
  }

  function sendMessage() {
    const room = activeRoom();
    const content = composerInput.value;
    if (!content.trim()) return;
    const block = blocker(room);
    const size = measure(content, room);
    if (block || size.over) {
      const why = block ? block.text : `Too long: ${size.over}.`;
      announce(why, 'assertive');
      const notice = $('composer-notice');
      notice.hidden = false;
      notice.textContent = why;
      notice.classList.remove('shake');
      void notice.offsetWidth; // restart the animation
      notice.classList.add('shake');
      return;
    }
    const ref = newRef('m');
    if (!send({ type: 'message', room: room.name, content, ref })) return;
    const el = renderLocal(room, content);
    place(room, el);
    state.pending.set(ref, { ref, room: room.name, content, el });
    composerInput.value = '';
    autosize();
    renderComposer();
    renderHistoryEdge();
    scrollToBottom();
  }

  function decide(item, verdict) {
    const id = Number(String(item.key).replace('item:', ''));
    const frame = verdict === 'approve' ? { type: 'approve', item: id } : { type: 'deny', item: id };
    const report = item.kind === 'report';
    const done =
      verdict === 'approve'
        ? report
          ? 'Report upheld; the message was deleted.'
          : 'Approved: the message is now in the room.'
        : report
          ? 'Report dismissed.'
          : 'Denied: the message was dropped.';
    request(frame, { kind: 'review', key: item.key, done, label: 'Review' });
  }

  // Dialog: one <dialog> for every question (report reason, mute length…).

  const dialog = $('dialog');

  /**
   * Asks the user; resolves with the fields' values, or null if cancelled.
   * fields: [{ name, label, type: 'text' | 'select', options: [[value, label]], value, required, hint }]
   */
  function ask({ title, text, fields = [], confirm = 'OK', danger = false }) {
    return new Promise((resolve) => {
      $('dialog-title').textContent = title;
      $('dialog-text').textContent = text || '';
      $('dialog-text').hidden = !text;
      const inputs = {};
      $('dialog-fields').replaceChildren(
        ...fields.map((field) => {
          const id = `dialog-${field.name}`;
          let input;
          if (field.type === 'select') {
            input = h(
              'select',
              { id, name: field.name },
              field.options.map(([value, label]) => h('option', { value, selected: value === field.value }, label)),
            );
          } else {
            input = h('input', {
              id,
              name: field.name,
              type: 'text',
              maxlength: '500',
              required: field.required,
              value: field.value || '',
              autocomplete: 'off',
            });
          }
          inputs[field.name] = input;
          return h(
            'div',
            { class: 'field' },
            h('label', { for: id }, field.label),
            input,
            field.hint ? h('p', { class: 'hint' }, field.hint) : null,
          );
        }),
      );
      const confirmButton = $('dialog-confirm');
      confirmButton.textContent = confirm;
      confirmButton.className = danger ? 'btn btn-danger' : 'btn btn-primary';
      const opener = document.activeElement;

      const finish = (values) => {
        $('dialog-form').removeEventListener('submit', onSubmit);
        $('dialog-cancel').removeEventListener('click', onCancel);
        dialog.removeEventListener('cancel', onCancel);
        if (dialog.open) dialog.close();
        if (opener && typeof opener.focus === 'function' && document.contains(opener)) opener.focus();
        resolve(values);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const values = {};
        for (const [name, input] of Object.entries(inputs)) {
          if (input.required && !input.value.trim()) {
            input.setAttribute('aria-invalid', 'true');
            input.focus();
            return;
          }
          values[name] = input.value.trim();
        }
        finish(values);
      };
      const onCancel = (event) => {
        event.preventDefault();
        finish(null);
      };
      $('dialog-form').addEventListener('submit', onSubmit);
      $('dialog-cancel').addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel);
      dialog.showModal();
      const first = Object.values(inputs)[0];
      (first || confirmButton).focus();
    });
  }

  const MUTE_OPTIONS = [
    ['60', '1 minute'],
    ['300', '5 minutes'],
    ['600', '10 minutes'],
    ['3600', '1 hour'],
    ['86400', '1 day'],
  ];
  const BAN_OPTIONS = [
    ['3600', '1 hour'],
    ['86400', '1 day'],
    ['604800', '7 days'],
    ['', 'Permanently'],
  ];
  const reasonField = (label, required = false) => ({
    name: 'reason',
    label,
    required,
    hint: required ? null : 'Optional. The user sees it.',
  });

  async function reportMessage(message) {
    const values = await ask({
      title: `Report a message from ${message.from}`,
      text: `“${truncate(message.content, 140)}”`,
      fields: [reasonField('Why should moderators look at it?', true)],
      confirm: 'Send report',
    });
    if (!values) return;
    request(
      { type: 'report', room: message.room, id: message.id, reason: values.reason },
      { kind: 'mod', label: 'Report', done: 'Thanks: the moderators will review your report.' },
    );
  }

  async function moderateDelete(message) {
    const values = await ask({
      title: `Delete this message from ${message.from}?`,
      text: message.content ? `“${truncate(message.content, 140)}”` : '',
      fields: [reasonField('Reason')],
      confirm: 'Delete',
      danger: true,
    });
    if (!values) return;
    request(
      { type: 'delete', room: message.room, id: message.id, reason: values.reason || undefined },
      { kind: 'mod', label: 'Delete', done: 'Message deleted.' },
    );
  }

  async function moderateMute(user, nick) {
    const values = await ask({
      title: `Mute ${nick}`,
      text: 'They stay in the room but cannot send messages until the mute ends.',
      fields: [
        { name: 'duration', label: 'Duration', type: 'select', options: MUTE_OPTIONS, value: '600' },
        reasonField('Reason'),
      ],
      confirm: 'Mute',
      danger: true,
    });
    if (!values) return;
    const duration = Number(values.duration);
    request(
      { type: 'mute', user, duration, reason: values.reason || undefined },
      { kind: 'mod', label: 'Mute', done: `${nick} is muted for ${formatSeconds(duration)}.` },
    );
  }

  function moderateUnmute(user, nick) {
    request({ type: 'unmute', user }, { kind: 'mod', label: 'Unmute', done: `${nick} can send messages again.` });
  }

  async function moderateKick(user, nick) {
    const values = await ask({
      title: `Kick ${nick}?`,
      text: 'They are disconnected now and may come back.',
      fields: [reasonField('Reason')],
      confirm: 'Kick',
      danger: true,
    });
    if (!values) return;
    request(
      { type: 'kick', user, reason: values.reason || undefined },
      { kind: 'mod', label: 'Kick', done: `${nick} was kicked.` },
    );
  }

  async function moderateBan(user, nick) {
    const values = await ask({
      title: `Ban ${nick}?`,
      text: 'They are disconnected and cannot come back until the ban ends. Guests are banned by address too.',
      fields: [
        { name: 'duration', label: 'Duration', type: 'select', options: BAN_OPTIONS, value: '86400' },
        reasonField('Reason'),
      ],
      confirm: 'Ban',
      danger: true,
    });
    if (!values) return;
    const frame = { type: 'ban', user, reason: values.reason || undefined };
    if (values.duration) frame.duration = Number(values.duration);
    const span = values.duration ? `for ${formatSeconds(Number(values.duration))}` : 'permanently';
    request(frame, { kind: 'mod', label: 'Ban', done: `${nick} is banned ${span}.` });
  }

  async function setSlowMode() {
    const room = activeRoom();
    if (!room) return;
    const values = await ask({
      title: `Slow mode in #${room.name}`,
      text: 'Members may send one message per interval. Moderators are exempt.',
      fields: [
        {
          name: 'seconds',
          label: 'Interval',
          type: 'select',
          options: [
            ['0', 'Off'],
            ['5', '5 seconds'],
            ['10', '10 seconds'],
            ['30', '30 seconds'],
            ['60', '1 minute'],
            ['300', '5 minutes'],
          ],
          value: String(room.slowMode || 0),
        },
      ],
      confirm: 'Apply',
    });
    if (!values) return;
    const seconds = Number(values.seconds);
    request(
      { type: 'slow_mode', room: room.name, seconds },
      {
        kind: 'mod',
        label: 'Slow mode',
        done: seconds ? `Slow mode on: one message every ${formatSeconds(seconds)}.` : 'Slow mode off.',
      },
    );
  }

  function toggleLock() {
    const room = activeRoom();
    if (!room) return;
    const type = room.locked ? 'unlock' : 'lock';
    request(
      { type, room: room.name },
      {
        kind: 'mod',
        label: room.locked ? 'Unlock' : 'Lock',
        done: room.locked ? `#${room.name} is open again.` : `#${room.name} is read-only for members.`,
      },
    );
  }

  async function changeNick() {
    const values = await ask({
      title: 'Change your nickname',
      fields: [
        {
          name: 'nick',
          label: 'New nickname',
          required: true,
          value: state.nick || (state.me && state.me.nick) || '',
          hint: '2–24 letters, digits, _ - or .',
        },
      ],
      confirm: 'Change',
    });
    if (!values) return;
    const problem = nickProblem(values.nick);
    if (problem) {
      toast(problem, 'error');
      return;
    }
    state.nick = values.nick;
    bannerNotice = null;
    renderBanner();
    request({ type: 'nick', nick: values.nick }, { kind: 'nick', label: 'Nickname change' });
  }

  function truncate(text, max) {
    const chars = Array.from(String(text || ''));
    return chars.length > max ? `${chars.slice(0, max).join('')}…` : chars.join('');
  }

  function rememberNick(nick) {
    try {
      localStorage.setItem('wardroom.nick', nick);
    } catch {
      // storage may be unavailable (private mode); nothing to do
    }
  }

  // ───────────────────────────── 7. Wiring ─────────────────────────────

  function readToken() {
    const fromUrl = params.get('token');
    try {
      if (fromUrl) sessionStorage.setItem('wardroom.token', fromUrl);
      state.token = fromUrl || sessionStorage.getItem('wardroom.token');
    } catch {
      state.token = fromUrl;
    }
    if (fromUrl) {
      // Keep the token out of the address bar, bookmarks and screenshots.
      const url = new URL(location.href);
      url.searchParams.delete('token');
      history.replaceState(null, '', url.pathname + url.search + url.hash);
    }
  }

  function setupLogin() {
    readToken();
    $('nick-field').hidden = Boolean(state.token);
    $('token-note').hidden = !state.token;
    let savedNick = '';
    try {
      savedNick = localStorage.getItem('wardroom.nick') || '';
    } catch {
      savedNick = '';
    }
    $('login-nick').value = params.get('nick') || savedNick;
    $('login-room').value = params.get('room') || 'lobby';

    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const nick = $('login-nick').value.trim();
      const room = $('login-room').value.trim();
      const nickError = state.token ? null : nickProblem(nick);
      const roomError = roomProblem(room);
      showFieldError('login-nick', nickError);
      showFieldError('login-room', roomError);
      if (nickError) {
        $('login-nick').focus();
        return;
      }
      if (roomError) {
        $('login-room').focus();
        return;
      }
      if (!state.token) {
        state.nick = nick;
        rememberNick(nick);
      }
      state.rooms.set(room, makeRoom(room));
      state.active = room;
      $('list-slot').replaceChildren(state.rooms.get(room).list);
      showChat();
      connect();
      renderAll();
      composerInput.focus();
    });
    (state.token ? $('login-room') : $('login-nick')).focus();
  }

  function setupChat() {
    $('composer').addEventListener('submit', (event) => {
      event.preventDefault();
      sendMessage();
    });
    composerInput.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        sendMessage();
      }
    });
    composerInput.addEventListener('input', () => {
      autosize();
      renderComposer();
    });

    $('join-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const input = $('join-room');
      const name = input.value.trim();
      const problem = roomProblem(name);
      showFieldError('join-room', problem);
      if (problem) return;
      input.value = '';
      joinRoom(name);
    });

    scroller.addEventListener(
      'scroll',
      () => {
        const room = activeRoom();
        if (!room) return;
        if (scroller.scrollTop < 120) loadOlder(room);
        if (nearBottom()) $('jump-new').hidden = true;
      },
      { passive: true },
    );
    $('load-older').addEventListener('click', () => loadOlder(activeRoom()));
    $('jump-new').addEventListener('click', () => {
      scrollToBottom();
      composerInput.focus();
    });
    $('reconnect-now').addEventListener('click', reconnectNow);
    $('change-nick').addEventListener('click', changeNick);
    $('slow-btn').addEventListener('click', setSlowMode);
    $('lock-btn').addEventListener('click', toggleLock);
    $('banner-close').addEventListener('click', () => {
      bannerNotice = null;
      renderBanner();
    });

    // Drawers (narrow screens): rooms on the left, people and review on the right.
    const drawer = (button, className) => {
      button.addEventListener('click', () => {
        const open = !document.body.classList.contains(className);
        document.body.classList.remove('rooms-open', 'side-open');
        $('toggle-rooms').setAttribute('aria-expanded', 'false');
        $('toggle-side').setAttribute('aria-expanded', 'false');
        document.body.classList.toggle(className, open);
        button.setAttribute('aria-expanded', String(open));
        $('backdrop').hidden = !open;
      });
    };
    drawer($('toggle-rooms'), 'rooms-open');
    drawer($('toggle-side'), 'side-open');
    const closeDrawers = () => {
      document.body.classList.remove('rooms-open', 'side-open');
      $('toggle-rooms').setAttribute('aria-expanded', 'false');
      $('toggle-side').setAttribute('aria-expanded', 'false');
      $('backdrop').hidden = true;
    };
    $('backdrop').addEventListener('click', closeDrawers);
    document.addEventListener('keydown', (event) => {
      if (event.key !== 'Escape') return;
      for (const menu of document.querySelectorAll('details.menu[open]')) menu.open = false;
      closeDrawers();
    });
    // Close an open menu when clicking elsewhere.
    document.addEventListener('click', (event) => {
      for (const menu of document.querySelectorAll('details.menu[open]')) {
        if (!menu.contains(event.target)) menu.open = false;
      }
    });

    // Back online: do not wait for the backoff.
    window.addEventListener('online', () => {
      if (!state.ws && !state.stopped && state.retryTimer) reconnectNow();
    });
  }

  /** Countdowns (mute, rate limit, slow mode, reconnect) tick here. */
  function tick() {
    const now = Date.now();
    if (state.mute && state.mute.until <= now) {
      state.mute = null;
      announce('Your mute has ended.');
    }
    const room = activeRoom();
    const counting = room && Math.max(room.rateUntil, room.slowUntil) > now - 1000;
    if (state.retryAt || state.mute || counting) {
      renderConnection();
      renderComposer();
    }
  }

  setupLogin();
  setupChat();
  renderComposer();
  setInterval(tick, 250);
})();
