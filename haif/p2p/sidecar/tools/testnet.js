#!/usr/bin/env node
'use strict'
// A local hyperdht testnet on 127.0.0.1 for tests and development. Prints one line of
// JSON, {"bootstrap": ["127.0.0.1:PORT"]}, and runs until stdin closes or SIGTERM.
//
//   node tools/testnet.js [--size N]

const { parseArgs } = require('util')
const createTestnet = require('@hyperswarm/testnet')

async function main () {
  const { values } = parseArgs({ options: { size: { type: 'string', default: '3' } } })
  const testnet = await createTestnet(Number(values.size), { host: '127.0.0.1' })
  const bootstrap = testnet.bootstrap.map(({ host, port }) => `${host}:${port}`)
  process.stdout.write(JSON.stringify({ bootstrap }) + '\n')
  let done = false
  const stop = async () => {
    if (done) return
    done = true
    await testnet.destroy()
    process.exit(0)
  }
  process.stdin.on('end', stop)
  process.stdin.on('close', stop)
  process.stdin.resume()
  process.once('SIGTERM', stop)
  process.once('SIGINT', stop)
}

main().catch((err) => {
  process.stderr.write(`testnet: ${err.stack || err}\n`)
  process.exit(1)
})
