// The chat page: one WebSocket session of the chatproto protocol (PROTOCOL.md).
// Each WebSocket text message carries exactly one frame in each direction.
//
// Everything the server or another user sends is put on the page with
// textContent or Element.append(string), never as HTML, so a message or a
// user name can never inject markup or script.
'use strict';

const $ = (id) => document.getElementById(id);

const ui = {
  loginView: $('login-view'),
  loginForm: $('login-form'),
  loginStatus: $('login-status'),
  loginButton: $('login-button'),
  username: $('username'),
  password: $('password'),
  chatView: $('chat-view'),
  log: $('log'),
  ended: $('ended'),
  endedText: $('ended-text'),
  relogin: $('relogin'),
  composer: $('composer'),
  line: $('line'),
  whoami: $('whoami'),
  me: $('me'),
  logout: $('logout'),
  onlineList: $('online-list'),
  onlineCount: $('online-count'),
  onlineEmpty: $('online-empty'),
};

// What the page knows about the current connection and session.
const state = {
  socket: null,
  phase: 'out',        // 'out' (login form), 'in' (chatting), 'ended' (session over)
  sessionId: null,
  user: null,
  lastUser: '',
  pending: [],         // requests awaiting their ok/error, in the order sent
  nextId: 1,
  online: new Set(),
  blocked: new Set(),  // blocks made or confirmed in this session
  framesSent: 0,
  framesReceived: 0,
  history: [],
  historyPos: 0,
  loggingIn: false,    // a login was asked for and is not answered yet
  lockTimer: null,
};

const LOGIN_ERRORS = {
  invalid_credentials: 'Wrong user name or password.',
  session_elsewhere: 'You are already logged in somewhere else (another tab or device). Log out there first, then try again.',
  already_logged_in: 'This connection is already logged in.',
  bad_arguments: 'That is not a valid user name or password. A name is 1 to 32 letters, digits, “_”, “.” or “-”; a password has no spaces.',
  unavailable: 'The server cannot log you in right now. Try again in a moment.',
  rate_limited: 'Too many attempts at once. Wait a moment, then try again.',
};

const BYE_REASONS = {
  logout: 'You logged out.',
  idle_timeout: 'You were logged out because the session was idle for too long.',
  server_shutdown: 'The server is shutting down. Log in again once it is back.',
  slow_consumer: 'The server closed the connection because this page fell behind reading messages.',
  server_full: 'The server is full right now. Try again later.',
  too_many_connections: 'Too many connections from your address. Close some other sessions, then try again.',
  login_timeout: 'The connection closed because it did not log in in time.',
  flood: 'The server closed the connection because this page sent too much too fast.',
};

ui.loginForm.addEventListener('submit', onLoginSubmit);
ui.composer.addEventListener('submit', onComposerSubmit);
ui.line.addEventListener('keydown', onLineKey);
ui.logout.addEventListener('click', () => runLine('logout'));
ui.relogin.addEventListener('click', showLoginView);
ui.username.focus();

// ---- Connection ------------------------------------------------------------

function openSocket() {
  const url = (location.protocol === 'https:' ? 'wss:' : 'ws:') + '//' + location.host + '/ws';
  const socket = new WebSocket(url);
  Object.assign(state, { socket, sessionId: null, pending: [], nextId: 1, framesSent: 0, framesReceived: 0 });
  // Events of a socket this page has already given up on are ignored.
  socket.addEventListener('message', (event) => socket === state.socket && onFrame(event.data));
  socket.addEventListener('close', () => socket === state.socket && onSocketClosed());
  return socket;
}

// Sends one frame and remembers what its answer will be about: answers to a
// connection's requests come back in the order of the requests.
function send(frame, request) {
  state.pending.push(request);
  state.socket.send(frame);
  state.framesSent += 1;
}

function sendJson(body, request) {
  request.id = state.nextId++;
  send(JSON.stringify({ ...body, id: request.id }), request);
}

function takePending(id) {
  const index = id === undefined ? 0 : state.pending.findIndex((r) => r.id === id);
  return index < 0 ? undefined : state.pending.splice(index, 1)[0];
}

function onFrame(data) {
  state.framesReceived += 1;
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    addEntry('error', ['The server sent a frame this page cannot read.']);
    return;
  }
  switch (frame.type) {
    case 'hello': state.sessionId = frame.session; break;
    case 'ok':
    case 'error': onAnswer(frame, takePending(frame.id)); break;
    case 'message': showMessage(frame); break;
    case 'broadcast': showBroadcast(frame); break;
    case 'presence': onPresence(frame); break;
    case 'bye': onBye(frame.reason); break;
    default: break; // later protocol versions may add frame types
  }
}

function onBye(reason) {
  const text = BYE_REASONS[reason] || `The server ended the session (${reason}).`;
  if (state.phase === 'in') {
    endSession(text);
  } else if (state.phase === 'out' && (state.loggingIn || reason !== 'login_timeout')) {
    // A login_timeout on an idle login form is no news: the next attempt reconnects.
    showLoginStatus('error', text);
    setLoginBusy(false);
  }
  // Whatever comes next needs a new connection.
  state.socket = null;
}

function onSocketClosed() {
  state.socket = null;
  state.pending = [];
  if (state.phase === 'in') {
    endSession('The connection to the server was lost.');
  } else if (state.phase === 'out' && state.loggingIn) {
    showLoginStatus('error', 'Could not reach the chat server. Check that it is running, then try again.');
    setLoginBusy(false);
  }
}

// ---- Login -----------------------------------------------------------------

function onLoginSubmit(event) {
  event.preventDefault();
  const user = ui.username.value.trim();
  const password = ui.password.value;
  if (!user || !password) {
    showLoginStatus('error', 'Enter your user name and password.');
    return;
  }
  stopLockCountdown();
  setLoginBusy(true);
  showLoginStatus('info', 'Logging in…');
  const socket = state.socket || openSocket();
  const login = () => sendJson({ cmd: 'login', user, password }, { kind: 'login' });
  if (socket.readyState === WebSocket.OPEN) login();
  else socket.addEventListener('open', login, { once: true });
}

function onLoginAnswer(frame) {
  setLoginBusy(false);
  if (frame.type === 'ok') {
    enterChat(frame.user);
  } else if (frame.code === 'account_locked') {
    startLockCountdown(frame.retry_after || 1);
  } else {
    showLoginStatus('error', LOGIN_ERRORS[frame.code] || frame.text || frame.code);
  }
  if (frame.type === 'error') {
    ui.password.select();
    ui.password.focus();
  }
}

// The lock lasts retry_after whole seconds: count them down live.
function startLockCountdown(seconds) {
  const until = Date.now() + seconds * 1000;
  const countdown = document.createElement('span');
  countdown.setAttribute('aria-live', 'off'); // announce the lock once, not every tick
  showLoginStatus('error', 'Too many failed attempts: this account is locked. Try again in ', countdown, '.');
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left > 0) {
      countdown.textContent = formatSeconds(left);
    } else {
      stopLockCountdown();
      showLoginStatus('info', 'The lock has ended: you can try again now.');
    }
  };
  tick();
  state.lockTimer = setInterval(tick, 250);
}

function stopLockCountdown() {
  clearInterval(state.lockTimer);
  state.lockTimer = null;
}

function formatSeconds(total) {
  const minutes = Math.floor(total / 60);
  const seconds = total % 60;
  return minutes ? `${minutes} min ${seconds} s` : `${seconds} s`;
}

function showLoginStatus(tone, ...parts) {
  ui.loginStatus.className = `login-status ${tone}`;
  ui.loginStatus.replaceChildren(...parts);
  ui.loginStatus.hidden = false;
}

function setLoginBusy(busy) {
  state.loggingIn = busy;
  ui.loginButton.disabled = busy;
  ui.loginButton.textContent = busy ? 'Logging in…' : 'Log in';
}

function showLoginView() {
  state.phase = 'out';
  ui.chatView.hidden = true;
  ui.loginView.hidden = false;
  ui.username.value = state.lastUser;
  ui.password.value = '';
  (state.lastUser ? ui.password : ui.username).focus();
}

// ---- Session -----------------------------------------------------------------

function enterChat(user) {
  Object.assign(state, { phase: 'in', user, lastUser: user, online: new Set(), blocked: new Set() });
  ui.loginStatus.hidden = true;
  ui.password.value = '';
  ui.loginView.hidden = true;
  ui.chatView.hidden = false;
  ui.ended.hidden = true;
  ui.me.textContent = user;
  ui.whoami.hidden = false;
  ui.logout.hidden = false;
  setComposerEnabled(true);
  ui.log.replaceChildren();
  renderOnline();
  addEntry('notice', [`Logged in as ${user}. Type “help” for the commands.`]);
  // Seed the online list; presence frames keep it current from here on.
  sendJson({ cmd: 'whoelse' }, { kind: 'seed' });
  ui.line.focus();
}

function endSession(text) {
  state.phase = 'ended';
  state.user = null;
  state.online.clear();
  renderOnline();
  ui.whoami.hidden = true;
  ui.logout.hidden = true;
  setComposerEnabled(false);
  addEntry('notice ending', [text]);
  ui.endedText.textContent = text;
  ui.ended.hidden = false;
  ui.relogin.focus();
}

function setComposerEnabled(enabled) {
  for (const control of ui.composer.elements) control.disabled = !enabled;
}

// ---- Typed lines -------------------------------------------------------------

function onComposerSubmit(event) {
  event.preventDefault();
  const line = ui.line.value;
  if (!line.trim()) return;
  state.history.push(line);
  state.historyPos = state.history.length;
  ui.line.value = '';
  runLine(line);
}

// Lines go to the server as typed: it parses the inline commands, so the page
// accepts exactly what the CLI accepts and shows the server's usage errors.
function runLine(line) {
  if (state.phase !== 'in' || !state.socket) return;
  if (/^\s*debug(\s+client)?\s*$/i.test(line)) {
    showClientDebug();
    return;
  }
  const request = { kind: 'line' };
  const outgoing = parseOutgoing(line);
  if (outgoing) request.bubble = showOutgoing(outgoing);
  else addEntry('echo', ['› ' + hidePassword(line)]);
  send(line, request);
  scrollToEnd();
}

// Mirrors the server's inline rule: the text starts after exactly one blank.
function parseOutgoing(line) {
  const direct = /^[ \t]*message[ \t]+([^ \t]+)[ \t](.*)$/i.exec(line);
  if (direct) return { to: direct[1], text: direct[2] };
  const all = /^[ \t]*broadcast[ \t](.*)$/i.exec(line);
  if (all) return { to: null, text: all[1] };
  return null;
}

function hidePassword(line) {
  return line.replace(/^(\s*login\s+\S+\s+)\S+/i, '$1••••');
}

// Up and down recall earlier lines, as in a terminal.
function onLineKey(event) {
  if (event.key !== 'ArrowUp' && event.key !== 'ArrowDown') return;
  const step = event.key === 'ArrowUp' ? -1 : 1;
  const pos = Math.min(Math.max(state.historyPos + step, 0), state.history.length);
  if (pos === state.historyPos) return;
  event.preventDefault();
  state.historyPos = pos;
  ui.line.value = state.history[pos] ?? '';
}

function startMessage(name) {
  ui.line.value = `message ${name} `;
  ui.line.focus();
}

function showClientDebug() {
  addEntry('reply', [
    `client: session ${state.sessionId}, user ${state.user}, ` +
      `${state.framesSent} frames sent, ${state.framesReceived} received, ` +
      `${state.pending.length} awaiting answers`,
  ]);
}

// ---- Answers -------------------------------------------------------------------

function onAnswer(frame, request) {
  if (request && request.kind === 'login') onLoginAnswer(frame);
  else if (frame.type === 'error') onError(frame, request);
  else onOk(frame, request);
}

function onOk(frame, request) {
  const seed = request && request.kind === 'seed';
  switch (frame.cmd) {
    case 'message':
      settle(request, frame.stored ? `queued: ${frame.to} is offline and gets it at their next login` : 'delivered');
      break;
    case 'broadcast':
      settle(request, frame.text);
      break;
    case 'whoelse':
      setOnline(frame.users || []);
      if (!seed) addEntry('reply', [frame.text]);
      break;
    case 'block':
      setBlocked(frame.user, true);
      addEntry('notice block', [`You blocked ${frame.user}: their messages to you are refused and they no longer see you online.`]);
      break;
    case 'unblock':
      setBlocked(frame.user, false);
      addEntry('notice', [`You unblocked ${frame.user}.`]);
      break;
    case 'help':
      showHelp(frame);
      break;
    case 'logout':
      break; // the bye that follows says it
    default:
      addEntry('reply', [frame.text || frame.cmd]);
  }
}

function onError(frame, request) {
  settle(request, 'not delivered', true);
  addEntry('error', [frame.text || frame.code]);
}

// Marks a message or broadcast bubble with what became of it.
function settle(request, text, failed = false) {
  if (!request || !request.bubble) return;
  const status = request.bubble.querySelector('.status');
  status.textContent = text;
  status.classList.toggle('failed', failed);
}

function showHelp(frame) {
  const list = el('ul', 'usage');
  for (const { usage } of frame.commands || []) list.append(el('li', '', el('code', '', usage)));
  list.append(el('li', '', el('code', '', 'debug client'), ' (answered by this page)'));
  addEntry('reply', ['Commands:', list]);
}

// ---- Events from others ----------------------------------------------------------

function showMessage(frame) {
  const meta = [el('span', 'who', frame.from), ' to you'];
  if (frame.offline) meta.push(el('span', 'badge offline', 'offline'));
  addBubble('incoming', meta, frame.text, frame.sent_at);
}

function showBroadcast(frame) {
  addBubble('incoming broadcast', [el('span', 'who', frame.from), ' to everyone', el('span', 'badge', 'broadcast')],
    frame.text, frame.sent_at);
}

function showOutgoing({ to, text }) {
  const meta = [el('span', 'who', 'You'), to ? ` to ${to}` : ' to everyone'];
  const bubble = addBubble(to ? 'outgoing' : 'outgoing broadcast', meta, text, Date.now());
  bubble.append(el('p', 'status', 'sending…'));
  return bubble;
}

function onPresence(frame) {
  if (frame.online) state.online.add(frame.user);
  else state.online.delete(frame.user);
  renderOnline();
  addEntry('notice presence', [frame.online ? `${frame.user} is online` : `${frame.user} went offline`]);
}

// ---- The online list ----------------------------------------------------------------

function setOnline(users) {
  state.online = new Set(users);
  renderOnline();
}

function setBlocked(user, blocked) {
  if (blocked) state.blocked.add(user);
  else state.blocked.delete(user);
  renderOnline();
}

function renderOnline() {
  const names = [...state.online].sort();
  ui.onlineList.replaceChildren(...names.map(onlineItem));
  ui.onlineCount.textContent = String(names.length);
  ui.onlineEmpty.hidden = names.length > 0;
}

function onlineItem(name) {
  const blocked = state.blocked.has(name);
  const item = el('li', blocked ? 'person blocked' : 'person');
  const pick = el('button', 'name', el('span', 'label', name));
  pick.type = 'button';
  pick.title = `Write to ${name}`;
  pick.addEventListener('click', () => startMessage(name));
  item.append(pick);
  if (blocked) item.append(el('span', 'badge blocked', 'blocked'));
  const action = blocked ? 'unblock' : 'block';
  const toggle = el('button', 'toggle', blocked ? 'Unblock' : 'Block');
  toggle.type = 'button';
  toggle.setAttribute('aria-label', `${blocked ? 'Unblock' : 'Block'} ${name}`);
  toggle.addEventListener('click', () => runLine(`${action} ${name}`));
  item.append(toggle);
  return item;
}

// ---- The log ----------------------------------------------------------------------

// A message or broadcast: who, to whom and when above the text.
function addBubble(kind, meta, text, sentAt) {
  const head = el('p', 'meta', ...meta, timeElement(sentAt));
  return appendToLog(el('li', `entry message ${kind}`, head, el('p', 'text', text)));
}

// Anything else: a notice, a reply or an error, with the time it arrived.
function addEntry(kind, parts) {
  return appendToLog(el('li', `entry ${kind}`, timeElement(Date.now()), el('div', 'body', ...parts)));
}

function appendToLog(item) {
  const stick = isScrolledToEnd();
  ui.log.append(item);
  if (stick) scrollToEnd();
  return item;
}

function timeElement(ms) {
  const date = new Date(ms);
  const sameDay = date.toDateString() === new Date().toDateString();
  const shown = sameDay
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
    : date.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
  const time = el('time', 'time', shown);
  time.dateTime = date.toISOString();
  time.title = date.toLocaleString();
  return time;
}

// Keep following new entries only if the reader has not scrolled up.
function isScrolledToEnd() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 48;
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

// Builds an element; strings among the children become text nodes.
function el(tag, className, ...children) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  element.append(...children);
  return element;
}
