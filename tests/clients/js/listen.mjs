// One user of an app built on @supabase/realtime-js, unmodified, as
// tests/clients.rs drives it:
//
//   node listen.mjs <endpoint> <vsn> <apikey> <access token> <owner uuid>
//
// `endpoint` is the gateway's `ws://HOST:PORT/realtime/v1` (the client adds
// `/websocket` and the query). The apikey goes in the URL, the user's token
// through `setAuth`, as supabase-js does it. Two channels on `public.notes`:
// `all` (no filter) and `mine` (`owner=eq.<owner uuid>`). Everything the app
// is handed goes to stdout as JSON lines:
//
//   {"channel":"all","status":"SUBSCRIBED","error":null,"ids":[123]}
//   {"channel":"all","system":{...}}        the payload of a `system` message
//   {"channel":"all","change":{...}}        the postgres_changes callback's argument
//
// (`ids`: the binding ids from the join reply, on SUBSCRIBED only.) The
// client's own log (every frame) goes to stderr. When stdin closes it prints
// `{"leaving":true}`, sends a heartbeat and prints `{"heartbeat":"ok"}` when
// it is answered, removes the channels (each leaves and reports CLOSED),
// closes the socket and prints `{"left":[<what each unsubscribe returned>],
// "close_code":<the socket's close code>}`.
import { RealtimeClient } from '@supabase/realtime-js'
// Node 20 has no global WebSocket (realtime-js declares node >= 22).
import WebSocket from 'ws'

const [endpoint, vsn, apikey, token, owner] = process.argv.slice(2)
if (!owner) {
  console.error('usage: node listen.mjs <endpoint> <vsn> <apikey> <access token> <owner uuid>')
  process.exit(2)
}

const out = (line) => process.stdout.write(JSON.stringify(line) + '\n')

// The client's `transport` option, recording the code the socket closed
// with (1005 or 1000 after a closing handshake, 1006 without one).
let closed
const closeCode = new Promise((resolve) => (closed = resolve))
class Transport extends WebSocket {
  constructor(...args) {
    super(...args)
    this.on('close', (code) => closed(code))
  }
}

const client = new RealtimeClient(endpoint, {
  params: { apikey },
  vsn,
  transport: Transport,
  logger: (kind, msg, data) => console.error(kind, msg, JSON.stringify(data)),
})
await client.setAuth(token)

const bindings = {
  all: { event: '*', schema: 'public', table: 'notes' },
  mine: { event: '*', schema: 'public', table: 'notes', filter: `owner=eq.${owner}` },
}
for (const [name, binding] of Object.entries(bindings)) {
  const channel = client.channel(name)
  channel
    .on('postgres_changes', binding, (payload) => out({ channel: name, change: payload }))
    .on('system', {}, (payload) => out({ channel: name, system: payload }))
    .subscribe((status, error) => {
      const line = { channel: name, status, error: error ? String(error.message) : null }
      if (status === 'SUBSCRIBED') {
        line.ids = (channel.bindings.postgres_changes ?? []).map((b) => b.id ?? null)
      }
      out(line)
    })
}

process.stdin.on('end', async () => {
  out({ leaving: true })
  const timeout = (what) => new Promise((resolve) => setTimeout(() => resolve(what), 10000))
  // One heartbeat, now, rather than every 25 s: its reply must come back.
  const beat = new Promise((resolve) =>
    client.onHeartbeat((status) => status !== 'sent' && resolve(status)),
  )
  client.sendHeartbeat()
  out({ heartbeat: await Promise.race([beat, timeout('no reply')]) })
  const left = await client.removeAllChannels()
  out({ left, close_code: await Promise.race([closeCode, timeout('not closed')]) })
  process.exit(0)
})
process.stdin.resume()
