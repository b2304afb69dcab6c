// One user of a Broadcast and Presence app built on @supabase/realtime-js,
// unmodified, as tests/clients.rs drives it:
//
//   node room.mjs <endpoint> <vsn> <apikey> <room> <config JSON>
//
// It joins `room` with the channel options `{config: <config JSON>}` and
// listens to every broadcast and to presence. Everything the app is handed
// goes to stdout as JSON lines:
//
//   {"status":"SUBSCRIBED"}
//   {"broadcast":{...}}                       the broadcast callback's argument
//   {"presence":"sync","state":{...}}         presenceState() at each sync
//   {"presence":"join","key":"k","new":[...]} / {"presence":"leave","key":"k","left":[...]}
//   {"system":{...}}                          a system message (e.g. a closed private channel's reason)
//   {"done":<command>,"result":...}           after each command
//
// Commands come on stdin, one JSON object per line:
//
//   {"op":"send","event":"e","payload":{...}}   channel.send({type:'broadcast',...})
//   {"op":"send_many","event":"e","count":50}   50 sends of {"i":n}, awaited in order
//   {"op":"track","meta":{...}} / {"op":"untrack"}
//   {"op":"http","event":"e","payload":{...}}   channel.httpSend (POST /api/broadcast/…)
//   {"op":"auth","token":"<jwt>"}               client.setAuth (access_token to every channel)
//
// When stdin closes it removes the channel, closes the socket and exits.
import { RealtimeClient } from '@supabase/realtime-js'
// Node 20 has no global WebSocket (realtime-js declares node >= 22).
import WebSocket from 'ws'
import readline from 'node:readline'

const [endpoint, vsn, apikey, room, config] = process.argv.slice(2)
if (!config) {
  console.error('usage: node room.mjs <endpoint> <vsn> <apikey> <room> <config JSON>')
  process.exit(2)
}

const out = (line) => process.stdout.write(JSON.stringify(line) + '\n')
// Presences without their refs (they differ per run), keys sorted.
const plain = (presences) => presences.map(({ presence_ref, ...meta }) => meta)
const state = (channel) =>
  Object.fromEntries(
    Object.entries(channel.presenceState())
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([key, presences]) => [key, plain(presences)]),
  )

const client = new RealtimeClient(endpoint, {
  params: { apikey },
  vsn,
  transport: WebSocket,
  logger: (kind, msg, data) => console.error(kind, msg, JSON.stringify(data)),
})
await client.setAuth(apikey)

const channel = client.channel(room, { config: JSON.parse(config) })
channel
  .on('broadcast', { event: '*' }, (payload) => out({ broadcast: payload }))
  .on('system', {}, (payload) => out({ system: payload }))
  .on('presence', { event: 'sync' }, () => out({ presence: 'sync', state: state(channel) }))
  .on('presence', { event: 'join' }, ({ key, newPresences }) =>
    out({ presence: 'join', key, new: plain(newPresences) }),
  )
  .on('presence', { event: 'leave' }, ({ key, leftPresences }) =>
    out({ presence: 'leave', key, left: plain(leftPresences) }),
  )
  .subscribe((status, error) => out({ status, error: error ? String(error.message) : null }))

const commands = readline.createInterface({ input: process.stdin })
// Commands run one after the other, in the order given.
let queue = Promise.resolve()
commands.on('line', (line) => {
  const command = JSON.parse(line)
  queue = queue.then(async () => {
    let result
    switch (command.op) {
      case 'send':
        result = await channel.send({ type: 'broadcast', event: command.event, payload: command.payload })
        break
      case 'send_many':
        result = []
        for (let i = 0; i < command.count; i++) {
          result.push(await channel.send({ type: 'broadcast', event: command.event, payload: { i } }))
        }
        break
      case 'track':
        result = await channel.track(command.meta)
        break
      case 'untrack':
        result = await channel.untrack()
        break
      case 'auth':
        await client.setAuth(command.token)
        result = 'ok'
        break
      case 'http':
        try {
          result = await channel.httpSend(command.event, command.payload)
        } catch (e) {
          result = String(e.message)
        }
        break
      default:
        result = `unknown op ${command.op}`
    }
    out({ done: command.op, result })
  })
})
commands.on('close', async () => {
  await queue
  await client.removeAllChannels()
  client.disconnect()
  process.exit(0)
})
