// End-to-end test of Wardroom's web client in headless Chromium.
//
//   node tests/browser/e2e.mjs <base-url> <moderator-token> <screenshot-dir>
//
// Run by tests/browser.rs against a real server whose config has a
// `profanity` filter rejecting "fuck", masking "darn" and holding 7+ digit
// numbers, a `size` filter (500 characters), a rate limit in the room
// "fast", the moderator "mod-1" (the token's subject), `history_on_join = 5`
// and an empty escalation ladder. Three pages share the room "lobby": the
// guest Alice, the moderator Sentinel (signed in with ?token=) and the guest
// Bob, whose WebSocket runs through Playwright's router so that the test can
// drop it or keep him away. Every check is about what the pages show.
//
// Once, the script prints "@@restart" and waits for a line "restarted" on
// stdin: tests/browser.rs then shuts the server down (every page gets 1001)
// and starts it again on the same port with the same database.
// Exit code 0: all passed.

import { chromium } from 'playwright-core';
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

const [base, modToken, shotDir] = process.argv.slice(2);
if (!base || !modToken || !shotDir) {
  console.error('usage: node e2e.mjs <base-url> <moderator-token> <screenshot-dir>');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT = 10_000;
const ROOM = 'lobby';
const ORIGIN = new URL(base).origin;
const WS_URL = `${ORIGIN.replace(/^http/, 'ws')}/ws`;

// A hard stop, so a hung browser can never hang the Rust test.
setTimeout(() => {
  console.error('e2e: gave up after 150 s');
  process.exit(3);
}, 150_000).unref();

const fromRust = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Asks tests/browser.rs to restart the server, and waits until it has. */
async function restartServer() {
  console.log('@@restart');
  const { value, done } = await fromRust.next();
  check(!done && value === 'restarted', `the test restarted the server (it answered ${JSON.stringify(value)})`);
}

mkdirSync(shotDir, { recursive: true });
for (const name of readdirSync(shotDir)) {
  if (name.startsWith('failure-')) rmSync(path.join(shotDir, name)); // left by an earlier failed run
}
const started = Date.now();
const step = (text) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${text}`);

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** Polls `probe` until it returns a truthy value; fails with `what` after `timeout`. */
async function eventually(what, probe, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(
        `timed out after ${timeout} ms waiting for: ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** What the message list of a page shows, in order. */
function messagesOf(page) {
  return page.$$eval('#list-slot li.msg', (items) =>
    items.map((li) => ({
      id: li.dataset.id ? Number(li.dataset.id) : null,
      state: li.dataset.state,
      author: li.querySelector('.msg-author')?.textContent ?? '',
      text: li.querySelector('.msg-text')?.textContent ?? '',
      status: li.querySelector('.msg-state')?.textContent ?? '',
      deleted: li.querySelector('.msg-deleted')?.textContent ?? '',
      note: li.querySelector('.msg-note')?.textContent ?? '',
    })),
  );
}

async function waitMessage(page, who, text, predicate = () => true) {
  return eventually(`${who} shows ${JSON.stringify(text)}`, async () =>
    (await messagesOf(page)).find((m) => m.text === text && predicate(m)),
  );
}

async function textOf(page, selector) {
  return (await page.locator(selector).textContent()) ?? '';
}

async function sendFrom(page, text) {
  const input = page.locator('#composer-input');
  await input.fill(text);
  await input.press('Enter');
}

const focusedId = (page) => page.evaluate(() => document.activeElement && document.activeElement.id);

/**
 * Accessibility checks of what a page shows now: every control has a name
 * (a label, aria-label or text), text meets WCAG AA contrast (4.5:1, or 3:1
 * for large text; disabled controls are exempt), and form fields stand out
 * from their surroundings (3:1, by border or fill).
 */
async function audit(page, where) {
  // Colours in the middle of a transition are not what people read.
  await page.evaluate(() =>
    Promise.all(
      document
        .getAnimations()
        .filter((a) => a.effect && a.effect.getComputedTiming().endTime !== Infinity)
        .map((a) => a.finished.catch(() => {})),
    ),
  );
  const found = await page.evaluate(() => {
    const out = [];
    const shown = (el) => {
      const box = el.getBoundingClientRect();
      return box.width > 1 && box.height > 1 && getComputedStyle(el).visibility !== 'hidden';
    };
    const parse = (colour) => {
      const m = /^rgba?\(([^)]+)\)$/.exec(colour);
      if (!m) return null;
      const [r, g, b, a = 1] = m[1]
        .split(/[\s,/]+/)
        .filter(Boolean)
        .map(Number);
      return { r, g, b, a };
    };
    const over = (top, under) => ({
      r: top.r * top.a + under.r * (1 - top.a),
      g: top.g * top.a + under.g * (1 - top.a),
      b: top.b * top.a + under.b * (1 - top.a),
      a: 1,
    });
    const luminance = ({ r, g, b }) => {
      const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const ratio = (x, y) => {
      const [hi, lo] = [luminance(x), luminance(y)].sort((p, q) => q - p);
      return (hi + 0.05) / (lo + 0.05);
    };
    const background = (el) => {
      const layers = [];
      for (let n = el; n; n = n.parentElement) {
        const c = parse(getComputedStyle(n).backgroundColor);
        if (c && c.a > 0) layers.push(c);
        if (c && c.a >= 1) break;
      }
      return layers.reverse().reduce((under, layer) => over(layer, under), { r: 255, g: 255, b: 255, a: 1 });
    };
    const opacity = (el) => {
      let o = 1;
      for (let n = el; n; n = n.parentElement) o *= Number(getComputedStyle(n).opacity);
      return o;
    };
    const rgb = (c) => `rgb(${Math.round(c.r)}, ${Math.round(c.g)}, ${Math.round(c.b)})`;

    const controls =
      'input:not([type=hidden]), select, textarea, button, summary, a[href], [tabindex]:not([tabindex="-1"])';
    for (const el of document.querySelectorAll(controls)) {
      if (!shown(el)) continue;
      const byId = (ids) => (ids || '').split(/\s+/).map((id) => document.getElementById(id)?.textContent ?? '');
      const names = [
        el.getAttribute('aria-label'),
        ...byId(el.getAttribute('aria-labelledby')),
        ...[...(el.labels || [])].map((label) => label.textContent),
        /^(BUTTON|SUMMARY|A)$/.test(el.tagName) ? el.textContent : '',
      ];
      if (!names.join('').trim()) out.push(`no accessible name: ${el.outerHTML.slice(0, 120)}`);
    }

    for (const el of document.querySelectorAll('body *')) {
      const hasText = [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
      if (!hasText || !shown(el) || el.closest(':disabled')) continue;
      const alpha = opacity(el);
      if (alpha < 0.05) continue; // not on screen (e.g. message actions until hover or focus)
      const style = getComputedStyle(el);
      const fg = parse(style.color);
      if (!fg) {
        out.push(`unexpected colour format ${style.color}`);
        continue;
      }
      const bg = background(el);
      const text = over({ ...fg, a: fg.a * alpha }, bg);
      const size = parseFloat(style.fontSize);
      const need = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700) ? 3 : 4.5;
      const got = ratio(text, bg);
      if (got < need) {
        out.push(
          `contrast ${got.toFixed(2)} < ${need} for "${el.textContent.trim().slice(0, 40)}" (${rgb(text)} on ${rgb(bg)})`,
        );
      }
    }

    for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
      if (!shown(el) || el.disabled) continue;
      const style = getComputedStyle(el);
      const around = background(el.parentElement);
      const border = parse(style.borderTopColor);
      const edge = border && parseFloat(style.borderTopWidth) > 0 ? ratio(over(border, around), around) : 1;
      const fill = ratio(background(el), around);
      if (Math.max(edge, fill) < 3)
        out.push(`the field #${el.id} hardly stands out (${Math.max(edge, fill).toFixed(2)} < 3)`);
    }
    return out;
  });
  check(found.length === 0, `${where}: ${found.join('; ')}`);
}

/** The audit in the light and the dark colour scheme. */
async function auditBothSchemes(page, where) {
  await audit(page, `${where} (light)`);
  await page.emulateMedia({ colorScheme: 'dark' });
  try {
    await audit(page, `${where} (dark)`);
  } finally {
    await page.emulateMedia({ colorScheme: 'light' });
  }
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  // launch() gives every run a fresh temporary profile (user-data-dir).
  args: [
    '--headless=new',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

const problems = [];
const dialogs = [];

async function newPage(name, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (error) => problems.push(`${name}: uncaught ${error.message}`));
  page.on('console', (message) => {
    const text = message.text();
    if (/Content Security Policy|Refused to/i.test(text)) problems.push(`${name}: CSP violation: ${text}`);
    else if (message.type() === 'error') console.log(`  (${name} console: ${text})`);
  });
  page.on('dialog', async (dialog) => {
    dialogs.push(`${name}: ${dialog.type()} ${dialog.message()}`);
    await dialog.dismiss();
  });
  // Nothing from a CDN, no web fonts: every request goes back to the server.
  context.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin !== ORIGIN && url.protocol !== 'data:') problems.push(`${name}: request to ${request.url()}`);
  });
  page.on('websocket', (ws) => {
    if (!ws.url().startsWith(WS_URL)) problems.push(`${name}: WebSocket to ${ws.url()}`);
  });
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(shotDir, `${name}.png`) });
}

let exitCode = 0;
try {
  // ── Sign in: the moderator with a token, Alice as a guest ──
  const mod = await newPage('moderator');
  await mod.goto(`${base}/?token=${encodeURIComponent(modToken)}&room=${ROOM}`);
  await mod.locator('#token-note').waitFor();
  check(!(await mod.locator('#login-nick').isVisible()), 'no nickname field when signing in with a token');
  check(!mod.url().includes('token='), 'the token is removed from the address bar');
  check((await mod.getByLabel('Room', { exact: true }).inputValue()) === ROOM, 'room taken from ?room=');
  await mod.getByRole('button', { name: 'Join chat' }).click();
  await mod.locator('#conn[data-state="online"]').waitFor();
  await mod.locator('#room-title', { hasText: `#${ROOM}` }).waitFor();
  check((await textOf(mod, '#me-nick')) === 'Sentinel', 'the moderator is named by the token');
  check((await textOf(mod, '#me-role')) === 'moderator', 'the moderator role is shown');
  await mod.locator('#review-panel').waitFor();
  step('moderator signed in with ?token= and joined #lobby; the review queue is shown');

  const alice = await newPage('alice');
  await alice.goto(`${base}/`);
  await shot(alice, 'login');
  await auditBothSchemes(alice, 'the sign-in form');
  await alice.getByLabel('Nickname').fill('Alice');
  await alice.getByLabel('Room', { exact: true }).fill(ROOM);
  await alice.getByLabel('Room', { exact: true }).press('Enter');
  await alice.locator('#conn[data-state="online"]').waitFor();
  check((await textOf(alice, '#me-nick')) === 'Alice', 'Alice got her nickname');
  check(await alice.locator('#review-panel').isHidden(), 'members see no review queue');
  await eventually('the moderator sees Alice in the member list', async () =>
    (await mod.locator('#member-list .member-nick').allTextContents()).includes('Alice'),
  );
  await eventually('Alice sees the moderator in the member list', async () =>
    (await alice.locator('#member-list .member-nick').allTextContents()).includes('Sentinel'),
  );
  await eventually(
    'member counts',
    async () => (await textOf(alice, '#member-count')) === '2' && (await textOf(mod, '#member-count')) === '2',
  );
  step('Alice joined as a guest; both member lists show both people');

  // A nickname in use (compared case-insensitively): the page says so, and what it got instead.
  const twin = await newPage('twin');
  await twin.goto(`${base}/?room=${ROOM}&nick=alice`);
  await twin.getByRole('button', { name: 'Join chat' }).click();
  await twin.locator('#banner', { hasText: 'The nickname “alice” cannot be used.' }).waitFor();
  const twinNick = await textOf(twin, '#me-nick');
  check(/^guest-\d+$/.test(twinNick), `the twin chats as a guest name: ${twinNick}`);
  check((await textOf(twin, '#banner-body')).includes(twinNick), 'the banner says which name the page got');
  step(`a nickname in use is refused with a reason; the page goes on as ${twinNick}`);
  await twin.context().close();

  // ── Chat: each sees the other's message and its own confirmed ──
  await sendFrom(alice, 'Hello from Alice');
  await waitMessage(
    alice,
    'Alice',
    'Hello from Alice',
    (m) => m.state === 'sent' && m.id !== null && m.status.includes('Sent'),
  );
  const seen = await waitMessage(mod, 'moderator', 'Hello from Alice', (m) => m.state === 'delivered');
  check(seen.author === 'Alice', 'the author is shown');
  await sendFrom(mod, 'Welcome, Alice');
  await waitMessage(mod, 'moderator', 'Welcome, Alice', (m) => m.state === 'sent');
  await waitMessage(alice, 'Alice', 'Welcome, Alice', (m) => m.state === 'delivered' && m.author === 'Sentinel');
  check(
    /^\d{1,2}:\d{2}/.test(await alice.locator('#list-slot li.msg .msg-time').first().textContent()),
    'messages show a time',
  );
  step("Alice and the moderator see each other's messages and their own confirmed (ack)");

  // ── Controls: moderators get them, members do not ──
  check(
    (await alice
      .locator('button[aria-label^="Delete message"], summary[aria-label^="Moderate"], button[aria-label^="Mute"]')
      .count()) === 0,
    'Alice sees no moderation controls',
  );
  check(
    (await alice.getByRole('button', { name: 'Report message from Sentinel' }).count()) === 1,
    "Alice can report the moderator's message",
  );
  check(
    (await mod.getByRole('button', { name: 'Delete message from Alice' }).count()) === 1,
    "the moderator can delete Alice's message",
  );
  check(
    (await mod.getByRole('button', { name: 'Mute Alice' }).count()) === 1,
    'the moderator can mute Alice from her message',
  );
  check(
    (await mod.locator('summary[aria-label="Moderate Alice"]').count()) === 1,
    'the moderator can act on Alice in the member list',
  );
  step("moderation controls only on the moderator's page");

  // ── A blocked word: the rejection is shown to its sender only ──
  await sendFrom(alice, 'what the fuck is this');
  const refused = await waitMessage(alice, 'Alice', 'what the fuck is this', (m) => m.state === 'failed');
  check(
    refused.status.includes('Blocked word') && refused.status.includes('not allowed'),
    `the refusal says why: ${refused.status}`,
  );
  await sendFrom(alice, 'sorry about that');
  await waitMessage(mod, 'moderator', 'sorry about that');
  check(!(await messagesOf(mod)).some((m) => m.text.includes('fuck')), 'the moderator never sees the refused message');
  check(
    (await mod.locator('#list-slot li.msg[data-state="failed"]').count()) === 0,
    'the moderator sees no refusal either',
  );
  step(`a blocked word is refused on Alice's page only ("${refused.status.trim()}")`);

  // ── The size limit: a live counter and no sending past the limit ──
  await alice.locator('#composer-input').fill('x'.repeat(17000));
  await alice.locator('#composer-notice[data-kind="too-long"]').waitFor();
  check((await textOf(alice, '#composer-notice')).includes('16,384 bytes'), "the notice names the server's limit");
  check(await alice.locator('#send-btn').isDisabled(), 'the send button is disabled when too long');
  check(
    (await alice.locator('#composer-counter').getAttribute('data-level')) === 'over',
    'the counter shows the overflow',
  );
  await alice.locator('#composer-input').fill('');
  await alice.locator('#composer-notice').waitFor({ state: 'hidden' });
  step('an over-long message is blocked before sending, with the limit shown');

  // A `size` filter's limit (500 characters) is not in `welcome`: the first
  // refusal names it, and from then on the page checks it before sending.
  const long = 'y'.repeat(600);
  await sendFrom(alice, long);
  const tooLong = await waitMessage(alice, 'Alice', long, (m) => m.state === 'failed');
  check(
    tooLong.status.includes('Too long') && tooLong.status.includes('the limit is 500'),
    `the refusal names the limit: ${tooLong.status}`,
  );
  await alice.locator('#composer-input').fill('z'.repeat(501));
  await alice.locator('#composer-notice[data-kind="too-long"]', { hasText: 'the limit is 500 characters' }).waitFor();
  check(await alice.locator('#send-btn').isDisabled(), 'a draft over the learnt limit cannot be sent');
  check(
    (await textOf(alice, '#composer-counter')).includes('501 / 500 characters'),
    `the counter counts against the limit: ${await textOf(alice, '#composer-counter')}`,
  );
  await alice.locator('#composer-input').fill('');
  step(`a size filter's refusal names its limit, and the page enforces it from then on ("${tooLong.status.trim()}")`);

  // Masked words: delivered with stars, and the sender is told.
  await sendFrom(alice, 'darn it all');
  const masked = await waitMessage(alice, 'Alice', '**** it all', (m) => m.state === 'sent');
  check(masked.note.includes('changed this message'), `Alice is told her message was changed: ${masked.note}`);
  const maskedForMod = await waitMessage(mod, 'moderator', '**** it all');
  check(maskedForMod.note === '', 'only the sender gets the note');
  check(!(await messagesOf(mod)).some((m) => m.text.includes('darn')), 'the word never reaches the moderator');
  step('a masked word arrives as stars, and only its sender is told why');

  // ── A held message: review queue, approval, delivery ──
  const heldText = 'call me on 555123456 tonight';
  await sendFrom(alice, heldText);
  const held = await waitMessage(alice, 'Alice', heldText, (m) => m.state === 'held');
  check(held.status.includes('Held for review'), `Alice is told it is held: ${held.status}`);
  const item = mod.locator('#review-list .review-item', { hasText: heldText });
  await item.waitFor();
  check((await item.locator('.kind-badge').textContent()) === 'Held', 'the review item is a held message');
  check((await mod.locator('#review-count').textContent()) === '1', 'the queue counts one item');
  check(!(await messagesOf(mod)).some((m) => m.text === heldText), 'a held message is not in the room yet');
  await shot(mod, 'moderator-review');
  await auditBothSchemes(mod, 'the moderator page with a held message');
  await auditBothSchemes(alice, 'a member page with a refused, a held and a masked message');
  await item.getByRole('button', { name: 'Approve' }).click();
  await item.waitFor({ state: 'detached' });
  await waitMessage(mod, 'moderator', heldText, (m) => m.state === 'delivered' && m.author === 'Alice');
  await waitMessage(alice, 'Alice', heldText, (m) => m.state === 'sent' && m.id !== null);
  await eventually(
    "the held placeholder is gone on Alice's page",
    async () => !(await messagesOf(alice)).some((m) => m.state === 'held'),
  );
  check(
    (await messagesOf(alice)).filter((m) => m.text === heldText).length === 1,
    'the approved message is shown once',
  );

  const deniedText = 'or try 5550001111';
  await sendFrom(alice, deniedText);
  await waitMessage(alice, 'Alice', deniedText, (m) => m.state === 'held');
  const item2 = mod.locator('#review-list .review-item', { hasText: deniedText });
  await item2.getByRole('button', { name: 'Deny' }).click();
  await item2.waitFor({ state: 'detached' });
  const denied = await waitMessage(alice, 'Alice', deniedText, (m) => m.state === 'denied');
  check(denied.status.includes('did not approve'), `Alice is told: ${denied.status}`);
  check(!(await messagesOf(mod)).some((m) => m.text === deniedText), 'a denied message never reaches the room');
  step('a held message reached the review queue and, once approved, both pages; a denied one, neither');

  // ── Markup from users is text ──
  const markup = '<img src=x onerror=alert(1)> <b>bold?</b> <script>alert(2)</script>';
  await sendFrom(alice, markup);
  await waitMessage(alice, 'Alice', markup, (m) => m.state === 'sent');
  await waitMessage(mod, 'moderator', markup);
  for (const page of [alice, mod]) {
    check(
      (await page.locator('#list-slot img, #list-slot b, #list-slot script').count()) === 0,
      'no element was created from the text',
    );
  }
  check(dialogs.length === 0, `no dialog fired: ${dialogs.join('; ')}`);
  step('HTML in a message is shown as literal text; no element and no dialog');

  // ── Reports ──
  await alice.getByRole('button', { name: 'Report message from Sentinel' }).click();
  await alice.getByLabel('Why should moderators look at it?').fill('testing the report button');
  await alice.getByRole('button', { name: 'Send report' }).click();
  const report = mod.locator('#review-list .review-item[data-kind="report"]', { hasText: 'Welcome, Alice' });
  await report.waitFor();
  check((await report.textContent()).includes('testing the report button'), 'the report shows its reason');
  await report.getByRole('button', { name: 'Dismiss' }).click();
  await report.waitFor({ state: 'detached' });
  step("Alice reported a message; it reached the moderator's queue and was dismissed");

  // ── Deletion ──
  await mod.getByRole('button', { name: 'Delete message from Alice' }).first().click();
  await mod.getByLabel('Reason').fill('cleaning up');
  await mod.locator('#dialog-confirm').click();
  for (const [name, page] of [
    ['Alice', alice],
    ['moderator', mod],
  ]) {
    await eventually(`${name} shows the first message as deleted`, async () =>
      (await messagesOf(page)).some((m) => m.deleted.includes('deleted by a moderator')),
    );
    check(
      !(await messagesOf(page)).some((m) => m.text === 'Hello from Alice'),
      `${name} no longer shows the deleted text`,
    );
  }
  step('a moderator deleted a message on both pages');

  // ── Mute (by keyboard only): Alice sees it, with a live countdown, and cannot send ──
  await mod.locator('summary[aria-label="Moderate Alice"]').focus();
  await mod.keyboard.press('Enter');
  await mod.getByRole('button', { name: 'Mute…' }).waitFor();
  await mod.keyboard.press('Tab');
  check(
    (await mod.evaluate(() => document.activeElement.textContent.trim())) === 'Mute…',
    'Tab goes from the member menu button to "Mute…"',
  );
  await mod.keyboard.press('Enter');
  await mod.locator('#dialog[open]').waitFor();
  check((await focusedId(mod)) === 'dialog-duration', 'the dialog opens with the focus on its first field');
  await auditBothSchemes(mod, 'the mute dialog');
  await mod.keyboard.press('ArrowUp');
  await mod.keyboard.press('ArrowUp');
  check((await mod.locator('#dialog-duration').inputValue()) === '60', 'arrow keys pick the duration');
  await mod.keyboard.press('Tab');
  check((await focusedId(mod)) === 'dialog-reason', 'Tab moves on to the reason');
  await mod.keyboard.type('Cooling off');
  await mod.keyboard.press('Enter');
  await mod.locator('#dialog[open]').waitFor({ state: 'detached' });
  await mod.locator('.toast', { hasText: 'Alice is muted for 1 minute' }).waitFor();
  const notice = alice.locator('#composer-notice[data-kind="muted"]');
  await notice.waitFor();
  // "… again in 59 s. …" (or "1:00 min" in the first instant)
  const countdown = /You are muted\. You can send again in (?:(\d+) s|(\d+):(\d{2}) min)\. Reason: Cooling off/;
  const remaining = async () => {
    const match = countdown.exec(await notice.textContent());
    return match ? (match[1] !== undefined ? Number(match[1]) : Number(match[2]) * 60 + Number(match[3])) : null;
  };
  const first = await remaining();
  check(
    first !== null && first > 50 && first <= 60,
    `the mute shows its remaining time: ${await notice.textContent()}`,
  );
  await eventually(
    'the mute countdown ticks',
    async () => {
      const now = await remaining();
      return now !== null && now < first;
    },
    4000,
  );
  await shot(alice, 'alice-muted');
  await sendFrom(alice, 'can anyone hear me');
  check(await alice.locator('#send-btn').isDisabled(), 'the send button is disabled while muted');
  check((await alice.locator('#composer-input').inputValue()) === 'can anyone hear me', 'the draft is kept');
  check(countdown.test(await notice.textContent()), 'sending is refused with the remaining time');
  check(!(await messagesOf(alice)).some((m) => m.text === 'can anyone hear me'), 'nothing was sent');
  step(`Alice is muted: "${(await notice.textContent()).trim()}"`);

  await mod.locator('summary[aria-label="Moderate Alice"]').click();
  await mod.getByRole('button', { name: 'Unmute' }).click();
  await notice.waitFor({ state: 'detached' });
  await alice.locator('#composer-input').press('Enter');
  await waitMessage(mod, 'moderator', 'can anyone hear me', (m) => m.author === 'Alice');
  step('the moderator unmuted Alice; her kept draft went through');

  // ── Slow mode and lock, from the moderator's room tools ──
  await mod.getByRole('button', { name: /^Slow mode/ }).click();
  await mod.getByLabel('Interval').selectOption('10');
  await mod.locator('#dialog-confirm').click();
  await alice.locator('#room-flags', { hasText: 'Slow mode · 10 seconds' }).waitFor();
  await sendFrom(alice, 'slow and steady');
  await waitMessage(alice, 'Alice', 'slow and steady', (m) => m.state === 'sent');
  const slow = alice.locator('#composer-notice[data-kind="slow"]');
  await slow.waitFor();
  check(
    /one message every 10 seconds\. You can send again in \d+ s\./.test(await slow.textContent()),
    `slow mode shows its countdown: ${await slow.textContent()}`,
  );
  step(`slow mode: "${(await slow.textContent()).trim()}"`);
  await mod.getByRole('button', { name: /^Slow mode/ }).click();
  await mod.getByLabel('Interval').selectOption('0');
  await mod.locator('#dialog-confirm').click();
  await slow.waitFor({ state: 'detached' });
  await alice.locator('#room-flags', { hasText: 'Slow mode' }).waitFor({ state: 'detached' });

  await mod.getByRole('button', { name: 'Lock room' }).click();
  const locked = alice.locator('#composer-notice[data-kind="locked"]');
  await locked.waitFor();
  await alice.locator('#composer-input').fill('is anyone there?');
  check(await alice.locator('#send-btn').isDisabled(), 'members cannot send in a locked room');
  check((await alice.locator('#room-flags').textContent()).includes('Read-only'), 'the room shows it is read-only');
  step(`lock: "${(await locked.textContent()).trim()}"`);
  await mod.getByRole('button', { name: 'Unlock room' }).click();
  await locked.waitFor({ state: 'detached' });
  check(await alice.locator('#send-btn').isEnabled(), 'sending works again after unlocking');
  await alice.locator('#composer-input').fill('');
  step("the moderator turned slow mode and the lock on and off; Alice's page followed");

  // ── A rate limit (only in the room "fast"), with its countdown ──
  await alice.getByLabel('Join a room').fill('fast');
  await alice.getByRole('button', { name: 'Join', exact: true }).click();
  await alice.locator('#room-title', { hasText: '#fast' }).waitFor();
  await alice.locator('#room-meta', { hasText: 'member' }).waitFor();
  await sendFrom(alice, 'first in fast');
  await waitMessage(alice, 'Alice', 'first in fast', (m) => m.state === 'sent');
  await sendFrom(alice, 'second in fast');
  const limited = await waitMessage(alice, 'Alice', 'second in fast', (m) => m.state === 'failed');
  check(limited.status.includes('Too fast'), `the refusal says why: ${limited.status}`);
  const rate = alice.locator('#composer-notice[data-kind="rate"]');
  await rate.waitFor();
  const rateText = await rate.textContent();
  check(/too fast\. You can send again in \d+ s\./.test(rateText), `the rate limit shows its countdown: ${rateText}`);
  await alice.locator('.room-btn', { hasText: 'lobby' }).click();
  await alice.locator('#room-title', { hasText: '#lobby' }).waitFor();
  check(await alice.locator('#composer-notice').isHidden(), 'the rate limit of #fast does not block #lobby');
  step(`rate limit in #fast: "${rateText.trim()}"; #lobby unaffected`);

  // ── Bob: history paging, a dropped connection, reconnection and catch-up ──
  const backlog = Array.from({ length: 6 }, (_, i) => `backlog ${i + 1}`);
  for (const text of backlog) await sendFrom(mod, text);
  await waitMessage(mod, 'moderator', backlog.at(-1), (m) => m.state === 'sent');
  const bob = await newPage('bob', { width: 1000, height: 480 });
  let bobRoute = null;
  let bobRefuse = false;
  let bobConnections = 0;
  const bobAttempts = []; // when each of Bob's connection attempts reached the router
  await bob.routeWebSocket(/\/ws/, (ws) => {
    bobConnections += 1;
    bobAttempts.push(Date.now());
    if (bobRefuse) {
      // What a server that is going down answers.
      ws.close({ code: 1001, reason: 'server shutting down' });
      return;
    }
    bobRoute = { page: ws, server: ws.connectToServer() };
  });
  // Bob signs in with the keyboard alone.
  await bob.goto(`${base}/?room=${ROOM}`);
  check((await focusedId(bob)) === 'login-nick', 'the sign-in form starts with the focus on the nickname');
  await bob.keyboard.type('Bob');
  await bob.keyboard.press('Tab');
  check((await focusedId(bob)) === 'login-room', 'Tab moves to the room');
  await bob.keyboard.press('Enter');
  await bob.locator('#conn[data-state="online"]').waitFor();
  check((await focusedId(bob)) === 'composer-input', 'after joining, the focus is in the message box');
  // `history_on_join = 5`: older messages come from `history` as Bob scrolls up.
  await waitMessage(bob, 'Bob', backlog.at(-1));
  const onJoin = await messagesOf(bob);
  check(
    onJoin.length === 5 && onJoin[0].text === backlog[1],
    `the join brought the last 5 messages: ${onJoin.map((m) => m.text)}`,
  );
  await eventually('Bob pages back to the first message', async () => {
    await bob.locator('#scroller').evaluate((el) => {
      el.scrollTop = 0;
    });
    return (
      (await messagesOf(bob)).some((m) => m.text === 'Welcome, Alice') &&
      (await bob.locator('#history-start').isVisible())
    );
  });
  const bobIds = (await messagesOf(bob)).map((m) => m.id);
  check(new Set(bobIds).size === bobIds.length, 'no message is shown twice');
  check(
    bobIds.every((id, i) => i === 0 || id > bobIds[i - 1]),
    'messages are in id order',
  );
  check(bobIds.length > onJoin.length, 'scrolling up loaded older messages');
  step(
    `Bob got 5 messages on joining and the rest by scrolling up (${bobIds.length} messages, ids ${bobIds[0]}–${bobIds.at(-1)})`,
  );

  bobRefuse = true;
  const dropped = Date.now();
  const attemptsBefore = bobAttempts.length;
  await bobRoute.page.close({ code: 1001, reason: 'server shutting down' });
  await bobRoute.server.close();
  await bob.locator('#banner', { hasText: 'The server is shutting down.' }).waitFor();
  await bob.locator('#conn-label', { hasText: /^Reconnecting in \d+ s$/ }).waitFor();
  await eventually('Bob tries to reconnect twice', async () => bobAttempts.length >= attemptsBefore + 2, 8000);
  // Capped exponential backoff with "equal jitter": the first retry after
  // 0.5–1 s, the second 1–2 s after that.
  const [retry1, retry2] = bobAttempts.slice(attemptsBefore);
  check(retry1 - dropped >= 400, `the first retry waited (${retry1 - dropped} ms)`);
  check(retry2 - retry1 >= 900, `the second retry waited longer (${retry2 - retry1} ms)`);
  check(
    (await bob.locator('#banner').textContent()).includes('The server is shutting down.'),
    'the banner still says why while the retries fail',
  );
  const missed = Array.from({ length: 8 }, (_, i) => `while Bob was away ${i + 1}`);
  for (const text of missed) await sendFrom(mod, text);
  await waitMessage(mod, 'moderator', missed.at(-1), (m) => m.state === 'sent');
  bobRefuse = false;
  // Either the next scheduled attempt gets through, or "Reconnect now" does.
  await bob
    .getByRole('button', { name: 'Reconnect now' })
    .click({ timeout: 2000 })
    .catch(() => {});
  await bob.locator('#conn[data-state="online"]').waitFor();
  await bob.locator('#banner').waitFor({ state: 'hidden' });
  await eventually('Bob caught up on everything he missed', async () => {
    const texts = (await messagesOf(bob)).map((m) => m.text);
    return missed.every((text) => texts.includes(text));
  });
  const after = await messagesOf(bob);
  const ids = after.map((m) => m.id);
  check(new Set(ids).size === ids.length, 'no duplicates after reconnecting');
  check(
    ids.every((id, i) => i === 0 || id > ids[i - 1]),
    'still in id order after reconnecting',
  );
  for (const text of missed) check(after.filter((m) => m.text === text).length === 1, `"${text}" shown exactly once`);
  step(
    `Bob's connection dropped (1001); retries after ${retry1 - dropped} and ${retry2 - retry1} ms; he caught up, no duplicates`,
  );

  // ── A real restart: the server shuts down (1001 to every page) and comes
  // back on the same port with the same database ──
  const heldAcross = 'my number is 5559876543';
  await sendFrom(alice, heldAcross);
  await waitMessage(alice, 'Alice', heldAcross, (m) => m.state === 'held');
  await mod.locator('#review-list .review-item', { hasText: heldAcross }).waitFor();
  const lastBefore = Math.max(...(await messagesOf(mod)).map((m) => m.id ?? 0));
  bobRefuse = true; // Bob stays away a little longer, and misses what is said meanwhile
  const shutdownShown = Promise.all(
    [alice, mod, bob].map((page) =>
      page.locator('#banner', { hasText: 'The server is shutting down.' }).waitFor({ timeout: 30_000 }),
    ),
  );
  await restartServer();
  await shutdownShown;
  for (const page of [alice, mod]) {
    await page.locator('#conn[data-state="online"]').waitFor({ timeout: 15_000 });
    await page.locator('#room-meta', { hasText: 'here' }).waitFor();
    await page.locator('#banner').waitFor({ state: 'hidden' });
  }
  // The moderator's page dropped its queue on reconnecting; the server sends the pending items again.
  const heldItem = mod.locator('#review-list .review-item', { hasText: heldAcross });
  await heldItem.waitFor();
  check((await mod.locator('#review-list .review-item').count()) === 1, 'the queue holds the one pending item');
  const afterRestart = ['after the restart 1', 'after the restart 2', 'after the restart 3'];
  for (const text of afterRestart) await sendFrom(mod, text);
  const firstAfter = await waitMessage(mod, 'moderator', afterRestart[0], (m) => m.state === 'sent');
  check(firstAfter.id > lastBefore, `message ids go on after the restart (${lastBefore} → ${firstAfter.id})`);
  await heldItem.getByRole('button', { name: 'Approve' }).click();
  await heldItem.waitFor({ state: 'detached' });
  await waitMessage(mod, 'moderator', heldAcross, (m) => m.author === 'Alice');
  await waitMessage(alice, 'Alice', heldAcross, (m) => m.state === 'sent');
  check(
    (await messagesOf(alice)).filter((m) => m.text === heldAcross).length === 1 &&
      !(await messagesOf(alice)).some((m) => m.state === 'held'),
    'Alice sees her approved message once, and no longer as held',
  );
  bobRefuse = false;
  await bob
    .getByRole('button', { name: 'Reconnect now' })
    .click({ timeout: 2000 })
    .catch(() => {});
  await bob.locator('#conn[data-state="online"]').waitFor({ timeout: 15_000 });
  await eventually('Bob caught up on what was said after the restart', async () => {
    const texts = (await messagesOf(bob)).map((m) => m.text);
    return [...afterRestart, heldAcross].every((text) => texts.includes(text));
  });
  const bobAfter = await messagesOf(bob);
  const bobAfterIds = bobAfter.map((m) => m.id);
  check(new Set(bobAfterIds).size === bobAfterIds.length, 'no duplicates after the restart');
  check(
    bobAfterIds.every((id, i) => i === 0 || id > bobAfterIds[i - 1]),
    'in id order after the restart',
  );
  for (const text of [...missed, ...afterRestart, heldAcross]) {
    check(bobAfter.filter((m) => m.text === text).length === 1, `"${text}" shown exactly once`);
  }
  // Bob answers from the keyboard (the focus is still in the message box).
  await bob.locator('#composer-input').focus();
  await bob.keyboard.type('Bob is back');
  await bob.keyboard.press('Enter');
  await waitMessage(alice, 'Alice', 'Bob is back', (m) => m.author === 'Bob');
  step('the server restarted: every page showed the shutdown, reconnected and caught up; the review queue came back');

  // ── Responsive layout: a phone-sized screen ──
  await alice.setViewportSize({ width: 390, height: 844 });
  await alice.locator('#toggle-side').waitFor();
  check(await alice.locator('#members-title').isHidden(), 'the member panel is collapsed on a phone');
  check(await alice.locator('#rooms-panel .panel-title').isHidden(), 'the rooms panel is collapsed on a phone');
  check(await alice.locator('#composer-input').isVisible(), 'the composer is on screen');
  await shot(alice, 'alice-phone');
  await audit(alice, 'a phone-sized screen');
  await alice.locator('#toggle-side').click();
  await alice.locator('#members-title').waitFor();
  await eventually('the drawer has slid in', async () => {
    const box = await alice.locator('#side-panel').boundingBox();
    return box && Math.abs(box.x + box.width - 390) < 1;
  });
  await shot(alice, 'alice-phone-members');
  await alice.keyboard.press('Escape');
  await alice.locator('#members-title').waitFor({ state: 'hidden' });
  await alice.setViewportSize({ width: 1280, height: 800 });
  step('on a phone-sized screen the panels collapse into drawers');

  // Let the status toasts fade out, for tidy screenshots.
  await Promise.all([alice, mod, bob].map((page) => page.locator('.toast').first().waitFor({ state: 'detached' })));
  await shot(alice, 'alice');
  await shot(mod, 'moderator');
  await shot(bob, 'bob');
  await mod.emulateMedia({ colorScheme: 'dark' });
  await shot(mod, 'moderator-dark');
  await mod.emulateMedia({ colorScheme: 'light' });

  // ── Kick, then ban: shown with the reason, and no automatic reconnect ──
  await mod.locator('summary[aria-label="Moderate Alice"]').click();
  await mod.getByRole('button', { name: 'Kick…' }).click();
  await mod.getByLabel('Reason').fill('Testing kicks');
  await mod.locator('#dialog-confirm').click();
  const banner = alice.locator('#banner[role="alert"]');
  await banner.locator('text=You were removed from the chat.').waitFor();
  check((await banner.textContent()).includes('Testing kicks'), 'the kick reason is shown');
  await alice.locator('#conn[data-state="stopped"]').waitFor();
  check(await alice.locator('#composer-input').isDisabled(), 'the composer is disabled after a kick');
  await shot(alice, 'alice-kicked');
  // No reconnect is scheduled: the state stays "stopped" (a retry would show "waiting").
  await new Promise((resolve) => setTimeout(resolve, 1500));
  check((await alice.locator('#conn').getAttribute('data-state')) === 'stopped', 'no automatic reconnect after a kick');
  step('a kick is shown with its reason, without reconnecting');

  await banner.getByRole('button', { name: 'Connect again' }).click();
  await alice.locator('#conn[data-state="online"]').waitFor();
  await eventually('Alice is back in the member list', async () =>
    (await mod.locator('#member-list .member-nick').allTextContents()).includes('Alice'),
  );
  await mod.locator('summary[aria-label="Moderate Alice"]').click();
  await mod.getByRole('button', { name: 'Ban…' }).click();
  await mod.getByLabel('Duration').selectOption('3600');
  await mod.getByLabel('Reason').fill('Testing bans');
  await mod.locator('#dialog-confirm').click();
  await banner.locator('text=You are banned from this chat.').waitFor();
  check((await banner.textContent()).includes('Testing bans'), 'the ban reason is shown');
  check(
    (await banner.getByRole('button', { name: 'Connect again' }).count()) === 0,
    'no way to reconnect while banned',
  );
  await alice.locator('#conn[data-state="stopped"]').waitFor();
  await shot(alice, 'alice-banned');
  await audit(alice, 'a banned page');
  step(`a ban is shown with its reason, without reconnecting ("${await textOf(alice, '#banner-body')}")`);

  // Guests are banned by address too: a new page from the same machine is refused, with the reason and the time left.
  const again = await newPage('alice-again');
  await again.goto(`${base}/?room=${ROOM}&nick=Alicia`);
  await again.getByRole('button', { name: 'Join chat' }).click();
  const refusedBanner = again.locator('#banner[role="alert"]', { hasText: 'You are banned from this chat.' });
  await refusedBanner.waitFor();
  const refusal = await textOf(again, '#banner-body');
  check(
    /Testing bans/.test(refusal) && /(59:\d\d|1 h 00) min/.test(refusal),
    `the refusal says why and for how long: ${refusal}`,
  );
  await again.locator('#conn[data-state="stopped"]').waitFor();
  step(`coming back while banned: "${refusal}"`);

  check(dialogs.length === 0, `no dialog fired: ${dialogs.join('; ')}`);
  check(problems.length === 0, `page problems: ${problems.join('; ')}`);
  step(`all checks passed; screenshots in ${shotDir}`);
} catch (error) {
  exitCode = 1;
  console.error(`e2e FAILED: ${error.stack || error}`);
  if (problems.length) console.error(`page problems: ${problems.join('; ')}`);
  for (const context of browser.contexts()) {
    for (const [i, page] of context.pages().entries()) {
      await page
        .screenshot({ path: path.join(shotDir, `failure-${browser.contexts().indexOf(context)}-${i}.png`) })
        .catch(() => {});
    }
  }
} finally {
  await browser.close();
}
process.exit(exitCode);
