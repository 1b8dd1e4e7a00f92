// Browser tests of the chat page that `chatserver --http` serves, in headless
// Chromium driven by playwright-core (which never downloads a browser).
//
//   cargo build -p chatserver && (cd web-tests && npm ci && npm test)
//
// Environment:
//   CHATSERVER      the server binary (default: target/debug/chatserver in the repo)
//   SCREENSHOT_DIR  where login.png, chat.png and chat-phone.png go
//                   (default: target/screenshots in the repo)
//   CHROMIUM        the browser (default: /usr/bin/chromium)
//
// The tests run in order and share one server: later ones build on the
// sessions the earlier ones opened.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const serverBin = process.env.CHATSERVER
  ? path.resolve(process.env.CHATSERVER)
  : path.join(repoRoot, 'target/debug/chatserver');
const shotDir = process.env.SCREENSHOT_DIR
  ? path.resolve(process.env.SCREENSHOT_DIR)
  : path.join(repoRoot, 'target/screenshots');

const ACCOUNTS = { alice: 'wonderland', bob: 'builder', carol: 'singer', dave: 'diver', erin: 'eagle' };
const DESKTOP = { width: 1000, height: 700 };
const PHONE = { width: 390, height: 844 };
const WAIT_MS = 5000;

const XSS = '<img src=x onerror=alert(1)>';

let workDir;
let browser;
let server;              // the shared server: { child, url, output() }
const servers = [];      // every server started, to kill them all at the end
const pages = [];        // every page opened, with what it reported
let alice, bob, dave;    // the pages of the users the tests follow

before(async () => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-web-tests-'));
  fs.mkdirSync(shotDir, { recursive: true });
  server = await startServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close().catch(() => {});
  for (const s of servers) stopServer(s);
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

// ---- The server -------------------------------------------------------------

// Starts chatserver on free ports and learns the page's URL from its log.
async function startServer(extraArgs = []) {
  const credentials = path.join(workDir, 'credentials.txt');
  fs.writeFileSync(credentials, Object.entries(ACCOUNTS).map(([u, p]) => `${u} ${p}\n`).join(''));
  // Every browser comes from 127.0.0.1: the per-address limits are off.
  const limitsOff = ['--max-connections-per-ip', '--max-unauthenticated-percent', '--max-pending-checks-per-ip',
    '--login-rate-per-ip', '--login-rate-per-name', '--tls-handshakes-per-ip', '--tls-handshakes']
    .filter((flag) => !extraArgs.includes(flag))
    .flatMap((flag) => [flag, '0']);
  const args = ['--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--no-db', '--credentials', credentials,
    ...limitsOff, ...extraArgs];
  const child = spawn(serverBin, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  const s = { child, output: '' };
  servers.push(s);
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => { s.output += chunk; });
  s.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  s.url = await new Promise((resolve, reject) => {
    const fail = (why) => {
      clearTimeout(timer);
      reject(new Error(`${why}\ncommand: ${serverBin} ${args.join(' ')}\n--- chatserver stderr ---\n${s.output}`));
    };
    const timer = setTimeout(() => fail('chatserver did not log "serving the chat page on http://..." within 10 s'), 10_000);
    child.on('error', (e) => fail(`cannot start chatserver: ${e.message}`));
    child.on('exit', (code, signal) => fail(`chatserver exited (${signal || `status ${code}`}) before serving the page`));
    child.stderr.on('data', () => {
      const found = /serving the chat page on (https?:\/\/[^\s\x1b]+)/.exec(s.output);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
  });
  return s;
}

function stopServer(s) {
  if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
}

// ---- Pages --------------------------------------------------------------------

// A page in a browser context of its own (its own cookies and storage), with
// every dialog, uncaught error and CSP violation recorded.
async function openPage(url = server.url, viewport = DESKTOP) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const record = { page, dialogs: [], errors: [], csp: [] };
  page.on('dialog', (dialog) => {
    record.dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  page.on('pageerror', (error) => record.errors.push(error.message));
  page.on('console', (message) => {
    if (/Content[- ]Security[- ]Policy/i.test(message.text())) record.csp.push(message.text());
  });
  pages.push(record);
  const response = await page.goto(url);
  assert.equal(response.status(), 200);
  return page;
}

// Fills the form and waits for the answer (the button comes back enabled).
async function logIn(page, user, password = ACCOUNTS[user], { enter = false } = {}) {
  await page.getByLabel('User name').fill(user);
  await page.getByLabel('Password', { exact: true }).fill(password);
  if (enter) await page.getByLabel('Password', { exact: true }).press('Enter');
  else await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#login-button:enabled').waitFor({ state: 'attached' });
}

async function logInOk(page, user) {
  await logIn(page, user);
  await page.locator('#me').getByText(user, { exact: true }).waitFor();
}

// Types a line in the input, as a person would, and sends it with Enter.
async function type(page, line) {
  const input = page.getByLabel('Message or command');
  await input.fill(line);
  await input.press('Enter');
}

// Waits for an entry of the log, by its classes and a piece of its text.
function entry(page, classes, text) {
  return page.locator(`#log > li.${classes.split(' ').join('.')}`).filter({ hasText: text });
}

function onlineEntry(page, name) {
  return page.locator('#online-list > li').filter({ has: page.getByRole('button', { name, exact: true }) });
}

// ---- The tests ------------------------------------------------------------------------

test('the page is served with its strict Content-Security-Policy', async () => {
  const response = await fetch(server.url);
  assert.equal(response.status, 200);
  const csp = response.headers.get('content-security-policy') || '';
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src 'self'/);
  assert.match(csp, /style-src 'self'/);
  const html = await response.text();
  assert.doesNotMatch(html, /<script>|<style|style=|\son[a-z]+=/i, 'no inline script or style in the page');
});

test('a wrong password shows the error; the login view screenshot', async () => {
  alice = await openPage();
  await alice.getByRole('heading', { name: 'Log in' }).waitFor();
  await alice.screenshot({ path: path.join(shotDir, 'login.png') });
  await logIn(alice, 'alice', 'not-her-password');
  await alice.locator('#login-status').getByText('Wrong user name or password.').waitFor();
  assert.equal(await alice.locator('#chat-view').isVisible(), false);
});

test('a locked account shows a live countdown', async () => {
  const page = await openPage();
  await logIn(page, 'carol', 'wrong-1');
  await page.locator('#login-status').getByText('Wrong user name or password.').waitFor();
  await logIn(page, 'carol', 'wrong-2');
  await logIn(page, 'carol', 'wrong-3', { enter: true });
  const status = page.locator('#login-status');
  await status.getByText('this account is locked').waitFor();
  const shown = () => status.textContent();
  const first = await shown();
  assert.match(first, /Try again in (1 min 0 s|\d+ s)\./);
  // The countdown moves by itself.
  await page.waitForFunction((before) => document.getElementById('login-status').textContent !== before, first);
  assert.match(await shown(), /Try again in \d+ s\./);
  await page.context().close();
});

test('two users log in and each sees the other online', async () => {
  await logInOk(alice, 'alice');
  bob = await openPage();
  await logIn(bob, 'bob', ACCOUNTS.bob, { enter: true });
  await bob.locator('#me').getByText('bob', { exact: true }).waitFor();
  await entry(alice, 'notice presence', 'bob is online').waitFor();
  await onlineEntry(alice, 'bob').waitFor();
  // bob's list is seeded with whoelse at login.
  await onlineEntry(bob, 'alice').waitFor();
  assert.equal(await bob.locator('#online-count').textContent(), '1');
});

test('messages go both ways and each side sees the other\'s', async () => {
  await type(alice, 'message bob hi bob, lunch at noon?');
  const atBob = entry(bob, 'message incoming', 'hi bob, lunch at noon?');
  await atBob.waitFor();
  assert.match(await atBob.locator('.meta').textContent(), /alice to you/);
  await entry(alice, 'message outgoing', 'hi bob, lunch at noon?').locator('.status').getByText('delivered').waitFor();

  // Picking a name in the online list starts a message to them.
  await bob.getByRole('button', { name: 'alice', exact: true }).click();
  assert.equal(await bob.getByLabel('Message or command').inputValue(), 'message alice ');
  await bob.keyboard.type('sure, see you there');
  await bob.keyboard.press('Enter');
  const atAlice = entry(alice, 'message incoming', 'sure, see you there');
  await atAlice.waitFor();
  assert.match(await atAlice.locator('.meta').textContent(), /bob to you/);

  await type(alice, 'broadcast standup in 5 minutes, room 2');
  const broadcast = entry(bob, 'message incoming broadcast', 'standup in 5 minutes, room 2');
  await broadcast.waitFor();
  assert.match(await broadcast.locator('.meta').textContent(), /alice to everyone/);
  await entry(alice, 'message outgoing broadcast', 'standup in 5 minutes').locator('.status')
    .getByText('broadcast delivered to 1 user').waitFor();
});

test('an offline message arrives at login with its original time and an offline marker', async () => {
  const sentFrom = Date.now();
  await type(alice, 'message dave the meeting moved to 3pm');
  const queued = entry(alice, 'message outgoing', 'the meeting moved to 3pm').locator('.status');
  await queued.getByText('queued: dave is offline').waitFor();
  const sentBy = Date.now();

  dave = await openPage();
  await logInOk(dave, 'dave');
  const delivered = entry(dave, 'message incoming', 'the meeting moved to 3pm');
  await delivered.waitFor();
  await delivered.locator('.badge').getByText('offline').waitFor();
  // The time shown is when alice sent it, not when dave logged in.
  const sentAt = Date.parse(await delivered.locator('time').getAttribute('datetime'));
  assert.ok(sentAt >= sentFrom - 1000 && sentAt <= sentBy, `sent_at ${sentAt} not within [${sentFrom}, ${sentBy}]`);
  await entry(alice, 'notice presence', 'dave is online').waitFor();
  await entry(bob, 'notice presence', 'dave is online').waitFor();
});

test('commands typed as in the CLI get their answers', async () => {
  await type(dave, 'whoami');
  await entry(dave, 'reply', 'you are dave').waitFor();
  await type(dave, 'whoelse');
  await entry(dave, 'reply', 'online now: alice, bob').waitFor();
  await type(dave, 'whoelsesince 60');
  await entry(dave, 'reply', 'online in the last 60 s: alice, bob').waitFor();
  await type(dave, 'help');
  await entry(dave, 'reply', 'message <user> <text...>').waitFor();
  await type(dave, 'frobnicate');
  await entry(dave, 'error', 'unknown command').waitFor();
  await type(dave, 'message nobody-here hi');
  await entry(dave, 'error', 'nobody-here').waitFor();
  await type(dave, 'debug client');
  await entry(dave, 'reply', 'client: session').waitFor();
  // Up recalls the previous line.
  await dave.getByLabel('Message or command').press('ArrowUp');
  assert.equal(await dave.getByLabel('Message or command').inputValue(), 'debug client');
  await dave.getByLabel('Message or command').fill('');
  await type(dave, 'broadcast hello everyone, dave here');
  await entry(alice, 'message incoming broadcast', 'hello everyone, dave here').waitFor();
  await entry(bob, 'message incoming broadcast', 'hello everyone, dave here').waitFor();
});

test('blocking is shown, and a message from the blocked user is refused', async () => {
  await type(bob, 'block alice');
  await entry(bob, 'notice block', 'You blocked alice').waitFor();
  const marked = onlineEntry(bob, 'alice');
  await marked.locator('.badge').getByText('blocked').waitFor();
  assert.match(await marked.getAttribute('class'), /\bblocked\b/);
  await bob.getByRole('button', { name: 'Unblock alice' }).waitFor();

  await type(alice, 'message bob are you still there?');
  await entry(alice, 'error', 'bob has blocked you').waitFor();
  await entry(alice, 'message outgoing', 'are you still there?').locator('.status').getByText('not delivered').waitFor();
});

test('screenshots of the chat view, desktop and phone', async () => {
  await bob.screenshot({ path: path.join(shotDir, 'chat.png') });
  await alice.setViewportSize(PHONE);
  await alice.getByLabel('Message or command').waitFor();
  await alice.screenshot({ path: path.join(shotDir, 'chat-phone.png') });
  await alice.setViewportSize(DESKTOP);
});

test('unblocking from the online list', async () => {
  await bob.getByRole('button', { name: 'Unblock alice' }).click();
  await entry(bob, 'notice', 'You unblocked alice').waitFor();
  await bob.getByRole('button', { name: 'Block alice' }).waitFor();
  assert.equal(await onlineEntry(bob, 'alice').locator('.badge').count(), 0);
});

test('markup in a message is shown as literal text, never run', async () => {
  await type(bob, `message alice ${XSS}`);
  const shown = entry(alice, 'message incoming', XSS);
  await shown.waitFor();
  assert.equal(await shown.locator('.text').textContent(), XSS);
  assert.match(await alice.locator('#log').innerText(), /<img src=x onerror=alert\(1\)>/);
  for (const page of [alice, bob]) assert.equal(await page.locator('#log img').count(), 0);
  // And as a broadcast.
  await type(alice, `broadcast ${XSS} to all`);
  await entry(bob, 'message incoming broadcast', `${XSS} to all`).waitFor();
  await entry(dave, 'message incoming broadcast', `${XSS} to all`).waitFor();
  for (const page of [alice, bob, dave]) assert.equal(await page.locator('img').count(), 0);
  for (const record of pages) assert.deepEqual(record.dialogs, []);
});

test('logging out says so, updates the others, and offers to log in again', async () => {
  await dave.getByRole('button', { name: 'Log out' }).click();
  await dave.locator('#ended').getByText('You logged out.').waitFor();
  await entry(alice, 'notice presence', 'dave went offline').waitFor();
  await onlineEntry(alice, 'dave').waitFor({ state: 'detached' });
  assert.equal(await dave.getByLabel('Message or command').isDisabled(), true);

  await dave.getByRole('button', { name: 'Log in again' }).click();
  await dave.getByRole('heading', { name: 'Log in' }).waitFor();
  assert.equal(await dave.getByLabel('User name').inputValue(), 'dave');
});

test('logging in as a user who is online elsewhere says so', async () => {
  await logIn(dave, 'alice');
  await dave.locator('#login-status').getByText('already logged in somewhere else').waitFor();
  await logInOk(dave, 'dave');
});

test('a server shutdown is announced', async () => {
  server.child.kill('SIGTERM');
  for (const page of [alice, bob, dave]) {
    await page.locator('#ended').getByText('The server is shutting down.').waitFor();
    await page.getByRole('button', { name: 'Log in again' }).waitFor();
  }
  const { code } = await server.exited;
  assert.equal(code, 0, `chatserver exit status\n${server.output}`);
});

test('an idle timeout is announced', async () => {
  const other = await startServer(['--idle-timeout-secs', '1']);
  const page = await openPage(other.url);
  await logInOk(page, 'erin');
  await page.locator('#ended').getByText('idle for too long').waitFor();
  assert.equal(await page.getByLabel('Message or command').isDisabled(), true);
  stopServer(other);
});

test('a connection lost without a bye is announced', async () => {
  const other = await startServer();
  const page = await openPage(other.url);
  await logInOk(page, 'erin');
  other.child.kill('SIGKILL');
  await page.locator('#ended').getByText('The connection to the server was lost.').waitFor();
  // Logging in again while the server is down says it cannot be reached.
  await page.getByRole('button', { name: 'Log in again' }).click();
  await logIn(page, 'erin');
  await page.locator('#login-status').getByText('Could not reach the chat server').waitFor();
});

test('no page ran injected script, broke its CSP or threw', () => {
  for (const record of pages) {
    assert.deepEqual(record.dialogs, [], 'dialogs');
    assert.deepEqual(record.csp, [], 'CSP violations');
    assert.deepEqual(record.errors, [], 'uncaught errors');
  }
});
