// Peer chat server for benchmarks: the Wardroom protocol subset that
// wardroom-loadgen speaks (welcome, join/joined, message broadcast), on `ws`.
// Run: npm ci && PORT=8090 node server.js
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 8090);
const wss = new WebSocketServer({ host: '127.0.0.1', port, path: '/ws', maxPayload: 16384 });
const rooms = new Map(); // name -> { members: Set<WebSocket>, nextId: number }
let sessions = 0;

wss.on('connection', (ws, req) => {
  const user = `guest:${++sessions}`;
  const nick = new URL(req.url, 'http://localhost').searchParams.get('nick') || user;
  const joined = new Set();
  ws.send(JSON.stringify({ type: 'welcome', protocol: 1 }));
  ws.on('message', (data) => {
    let req;
    try { req = JSON.parse(data) || {}; } catch { req = {}; }
    const room = typeof req.room === 'string' ? req.room : '';
    if (req.type === 'join' && room) {
      if (!rooms.has(room)) rooms.set(room, { members: new Set(), nextId: 1 });
      rooms.get(room).members.add(ws);
      joined.add(room);
      ws.send(JSON.stringify({ type: 'joined', room }));
    } else if (req.type === 'message' && joined.has(room) && typeof req.content === 'string') {
      const r = rooms.get(room);
      const text = JSON.stringify({ type: 'message', room, id: r.nextId++, from: nick, user, content: req.content, ts: Date.now() });
      const frame = Buffer.from(text); // encode once; every member gets the same bytes as a text frame
      for (const member of r.members) member.send(frame, { binary: false });
    } else {
      ws.send(JSON.stringify({ type: 'error', code: 'bad_request', message: 'expected join or message (in a joined room)' }));
    }
  });
  ws.on('close', () => {
    for (const room of joined) {
      const r = rooms.get(room);
      r.members.delete(ws);
      if (r.members.size === 0) rooms.delete(room);
    }
  });
});
wss.on('listening', () => console.log(`node-ws peer listening on ws://127.0.0.1:${port}/ws`));
