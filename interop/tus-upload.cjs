#!/usr/bin/env node
// tus-upload.cjs: upload one file with tus-js-client (IETF resumable upload
// drafts) and print one JSON line saying what happened.  Run by
// test_interop.py through http_bucket_testing.run_tus_upload; usable by hand:
//
//   cd interop && npm ci
//   node interop/tus-upload.cjs --help
//   node interop/tus-upload.cjs FILE http://127.0.0.1:8000/upload/a.bin --protocol ietf-draft-05
//
// Exit status 0 with {"ok":true,...} when the upload finished (or stopped
// where --abort-after-chunks asked), 1 with {"ok":false,"error":...} when it
// failed, 2 for a usage error (message on stderr).  Nothing is retried
// (retryDelays null) unless --retry-delays says so.
'use strict'

const crypto = require('crypto')
const fs = require('fs')
const path = require('path')
const { parseArgs } = require('util')

const DRIVER_VERSION = '1'
const PROTOCOLS = ['ietf-draft-05', 'ietf-draft-03', 'tus-v1']

const USAGE = `usage: node tus-upload.cjs [options] FILE ENDPOINT

Uploads FILE to ENDPOINT (the creation URL, e.g. http://127.0.0.1:PORT/upload/NAME)
with tus-js-client and prints one JSON line:
  {"ok":true,"protocol":...,"url":UPLOAD_URL,"offset":N,"size":N,"sha256":HEX,"aborted":false}
  {"ok":false,"protocol":...,"url":UPLOAD_URL|null,"error":TEXT,"status":N|null,"body":TEXT|null}
Exit status: 0 ok, 1 upload failed, 2 usage error.

options:
  --protocol P            ietf-draft-05 (interop version 6, the default),
                          ietf-draft-03 (interop version 5), or tus-v1
  --chunk-size N          bytes per request (default: the whole file in one PATCH)
  --with-data             send data in the creation request (uploadDataDuringCreation)
  --creation-method M     send the creation request with method M (e.g. PUT)
                          instead of tus-js-client's POST (a custom httpStack)
  --upload-url URL        resume the upload at URL (HEAD, then PATCH from its
                          offset) instead of creating one
  --abort-after-chunks N  stop after N requests with data; prints the URL to
                          resume with --upload-url ("aborted": true, exit 0)
  --terminate             DELETE the upload once it finished
  --header 'Name: value'  an extra request header (repeatable)
  --metadata key=value    Upload-Metadata pair (repeatable; default filename=<FILE's name>)
  --retry-delays A,B,..   retry delays in ms (default: no retries)
  --version               print the driver's, tus-js-client's and node's versions as JSON
  -h, --help              this text
`

function usageError (message) {
  process.stderr.write(`tus-upload.cjs: ${message} (--help tells the usage)\n`)
  process.exit(2)
}

function parse (argv) {
  let parsed
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        protocol: { type: 'string', default: 'ietf-draft-05' },
        'chunk-size': { type: 'string' },
        'with-data': { type: 'boolean', default: false },
        'creation-method': { type: 'string' },
        'upload-url': { type: 'string' },
        'abort-after-chunks': { type: 'string' },
        terminate: { type: 'boolean', default: false },
        header: { type: 'string', multiple: true, default: [] },
        metadata: { type: 'string', multiple: true },
        'retry-delays': { type: 'string' },
        version: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false }
      }
    })
  } catch (err) {
    usageError(err.message)
  }
  return parsed
}

function positiveInteger (name, text) {
  if (text === undefined) return null
  const value = Number(text)
  if (!Number.isSafeInteger(value) || value <= 0) usageError(`${name} wants a positive integer, not ${JSON.stringify(text)}`)
  return value
}

function pairs (name, items, separator) {
  const result = {}
  for (const item of items) {
    const at = item.indexOf(separator)
    if (at <= 0) usageError(`${name} wants 'key${separator}value', not ${JSON.stringify(item)}`)
    result[item.slice(0, at).trim()] = item.slice(at + 1).trim()
  }
  return result
}

function versions () {
  let tus = null
  try {
    tus = require('tus-js-client/package.json').version
  } catch (err) {
    tus = null
  }
  return { driver: DRIVER_VERSION, 'tus-js-client': tus, node: process.versions.node }
}

function sha256File (file) {
  return new Promise((resolve, reject) => {
    const hash = crypto.createHash('sha256')
    fs.createReadStream(file)
      .on('error', reject)
      .on('data', (piece) => hash.update(piece))
      .on('end', () => resolve(hash.digest('hex')))
  })
}

// tus-js-client always creates with POST <endpoint>; this stack sends that
// one request with another method (PUT: the draft's creation on a named URL).
function methodRewritingStack (tus, endpoint, method) {
  const base = new tus.DefaultHttpStack({})
  return {
    getName: () => `MethodRewritingStack(POST->${method})`,
    createRequest: (requestMethod, url) =>
      base.createRequest(requestMethod === 'POST' && url === endpoint ? method : requestMethod, url)
  }
}

// Resolves to true when stopped by abortAfterChunks, false when finished;
// holder.upload is the Upload (its url is known once created, also on failure).
function upload (tus, file, options, abortAfterChunks, holder) {
  return new Promise((resolve, reject) => {
    let chunks = 0
    let aborted = false
    const source = fs.createReadStream(file) // tus-js-client reads slices by path
    const up = new tus.Upload(source, {
      ...options,
      onError: reject,
      onSuccess: () => resolve(false),
      onChunkComplete: () => {
        chunks += 1
        if (abortAfterChunks !== null && chunks >= abortAfterChunks && !aborted) {
          aborted = true
          up.abort(false).then(() => resolve(true), reject)
        }
      }
    })
    holder.upload = up
    up.start()
  })
}

async function main () {
  const { values, positionals } = parse(process.argv.slice(2))
  if (values.help) {
    process.stdout.write(USAGE)
    return 0
  }
  if (values.version) {
    console.log(JSON.stringify(versions()))
    return 0
  }
  if (positionals.length !== 2) usageError('wants FILE and ENDPOINT')
  const [file, endpoint] = positionals
  const protocol = values.protocol
  if (!PROTOCOLS.includes(protocol)) usageError(`--protocol is one of ${PROTOCOLS.join(', ')}`)
  const chunkSize = positiveInteger('--chunk-size', values['chunk-size'])
  const abortAfterChunks = positiveInteger('--abort-after-chunks', values['abort-after-chunks'])
  const headers = pairs('--header', values.header, ':')
  const metadata = values.metadata ? pairs('--metadata', values.metadata, '=') : { filename: path.basename(file) }
  let retryDelays = null
  if (values['retry-delays'] !== undefined) {
    retryDelays = values['retry-delays'].split(',').map((text) => Number(text))
    if (retryDelays.some((delay) => !Number.isFinite(delay) || delay < 0)) usageError('--retry-delays wants numbers, e.g. 0,1000')
  }
  let size
  try {
    size = fs.statSync(file).size
  } catch (err) {
    usageError(`cannot read FILE: ${err.message}`)
  }

  const tus = require('tus-js-client')
  const options = {
    endpoint,
    protocol,
    headers,
    metadata,
    retryDelays,
    chunkSize: chunkSize === null ? Infinity : chunkSize,
    uploadDataDuringCreation: values['with-data'],
    storeFingerprintForResuming: false
  }
  if (values['upload-url']) options.uploadUrl = values['upload-url']
  if (values['creation-method']) options.httpStack = methodRewritingStack(tus, endpoint, values['creation-method'].toUpperCase())

  const holder = { upload: null }
  try {
    const sha256 = await sha256File(file)
    const aborted = await upload(tus, file, options, abortAfterChunks, holder)
    const url = holder.upload.url
    if (values.terminate && !aborted) await tus.Upload.terminate(url, { protocol, headers, retryDelays })
    console.log(JSON.stringify({
      ok: true,
      protocol,
      url,
      offset: holder.upload._offset, // the offset the server last confirmed
      size,
      sha256,
      aborted
    }))
    return 0
  } catch (err) {
    const response = err && err.originalResponse
    console.log(JSON.stringify({
      ok: false,
      protocol,
      url: holder.upload ? holder.upload.url : null,
      error: String((err && err.message) || err),
      status: response ? response.getStatus() : null,
      body: response ? response.getBody() : null
    }))
    return 1
  }
}

main().then((status) => process.exit(status), (err) => {
  console.log(JSON.stringify({ ok: false, error: String((err && err.stack) || err) }))
  process.exit(1)
})
