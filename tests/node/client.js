#!/usr/bin/env node
// A Node proxyless gRPC client (@grpc/grpc-js-xds) of the demo Echo
// service, for the end-to-end tests: it dials `xds:///<service>`, so
// grpc-js reads the listener, routes, cluster and endpoints over ADS from
// the xDS server its bootstrap names (GRPC_XDS_BOOTSTRAP, a file, or
// GRPC_XDS_BOOTSTRAP_CONFIG, the JSON itself) and balances the calls
// itself, and counts which instance answered each call.
//
//   node client.js [--target xds:///echo] (--calls N | --duration-ms MS)
//                  [--concurrency C] [--report-ms MS] [--deadline-ms MS]
//                  [--credentials insecure|xds [--server-name NAME]]
//
// --credentials xds makes the channel apply the security the control
// plane sends (gRFC A29): mTLS with the certificates of the bootstrap's
// certificate provider to instances behind a sidecar, plaintext (the
// fallback) to the others. The default, insecure, is plaintext to all.
// --server-name is the TLS server name (SNI) sent to those sidecars:
// grpc-js sends the target's host (`echo`) and ignores the cluster's
// `sni`, while ISDP's sidecars pick a service's certificate by
// `<service>.svc.<trust-domain>`.
//
// Output, on stdout, one JSON object a line:
//   {"type":"window","t_ms":T,"calls":N,"instances":{"echo-1":n,...},
//    "errors":{"UNAVAILABLE":n,...}}
//       every --report-ms (when given): the calls finished in that window,
//       T being the window's end in ms since the client started;
//   {"type":"summary","calls":N,"instances":{...},"errors":{...},
//    "messages":{"UNAVAILABLE":"first message",...}}
//       once, at the end (also on SIGTERM / SIGINT), over the whole run.
// `instances` counts successful calls by the reply's `instance` field;
// `errors` counts failed calls by gRPC status code name. The exit code is
// 0 whatever the calls did (the caller judges the counts), 2 for bad
// arguments or a client that cannot start.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const grpcXds = require('@grpc/grpc-js-xds');

const PROTO = path.join(__dirname, '..', '..', 'examples', 'proto', 'echo.proto');

function usage(message) {
  process.stderr.write(
    `client.js: ${message}\nusage: node client.js [--target xds:///echo] ` +
      '(--calls N | --duration-ms MS) [--concurrency C] [--report-ms MS] [--deadline-ms MS] ' +
      '[--credentials insecure|xds [--server-name NAME]]\n',
  );
  process.exit(2);
}

/** A positive integer option, or `fallback` when absent. */
function positive(values, name, fallback) {
  const raw = values[name];
  if (raw === undefined) {
    return fallback;
  }
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) {
    usage(`--${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return n;
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        target: { type: 'string', default: 'xds:///echo' },
        calls: { type: 'string' },
        'duration-ms': { type: 'string' },
        concurrency: { type: 'string' },
        'report-ms': { type: 'string' },
        'deadline-ms': { type: 'string' },
        credentials: { type: 'string', default: 'insecure' },
        'server-name': { type: 'string' },
      },
      strict: true,
    });
  } catch (e) {
    usage(e.message);
  }
  const v = parsed.values;
  const opts = {
    target: v.target,
    calls: positive(v, 'calls', undefined),
    durationMs: positive(v, 'duration-ms', undefined),
    concurrency: positive(v, 'concurrency', 4),
    reportMs: positive(v, 'report-ms', undefined),
    deadlineMs: positive(v, 'deadline-ms', 5000),
    credentials: v.credentials,
    serverName: v['server-name'],
  };
  if (!['insecure', 'xds'].includes(opts.credentials)) {
    usage(`--credentials must be insecure or xds, got ${JSON.stringify(opts.credentials)}`);
  }
  if (opts.serverName !== undefined && opts.credentials !== 'xds') {
    usage('--server-name needs --credentials xds');
  }
  if ((opts.calls === undefined) === (opts.durationMs === undefined)) {
    usage('give exactly one of --calls and --duration-ms');
  }
  if (!process.env.GRPC_XDS_BOOTSTRAP && !process.env.GRPC_XDS_BOOTSTRAP_CONFIG) {
    usage('set GRPC_XDS_BOOTSTRAP (a bootstrap file) or GRPC_XDS_BOOTSTRAP_CONFIG (its JSON)');
  }
  return opts;
}

/** Counts of successes by instance and failures by status code. */
class Tally {
  constructor() {
    this.calls = 0;
    this.instances = {};
    this.errors = {};
  }

  ok(instance) {
    this.calls += 1;
    this.instances[instance] = (this.instances[instance] || 0) + 1;
  }

  failed(code) {
    this.calls += 1;
    this.errors[code] = (this.errors[code] || 0) + 1;
  }

  json() {
    return { calls: this.calls, instances: this.instances, errors: this.errors };
  }
}

function print(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function main() {
  const opts = options();
  grpcXds.register();
  const definition = protoLoader.loadSync(PROTO, { keepCase: true, defaults: true });
  const Echo = grpc.loadPackageDefinition(definition).isdp.examples.echo.v1.Echo;
  const insecure = grpc.credentials.createInsecure();
  const credentials =
    opts.credentials === 'xds' ? new grpcXds.XdsChannelCredentials(insecure) : insecure;
  const channelOptions = {};
  if (opts.serverName !== undefined) {
    channelOptions['grpc.ssl_target_name_override'] = opts.serverName;
  }
  const client = new Echo(opts.target, credentials, channelOptions);

  const started = Date.now();
  const total = new Tally();
  // The first message per status code, to tell a test's reader why.
  const messages = {};
  let window = new Tally();
  let issued = 0;
  let stopping = false;

  const more = () =>
    !stopping &&
    (opts.calls !== undefined ? issued < opts.calls : Date.now() - started < opts.durationMs);

  const call = () =>
    new Promise((resolve) => {
      const deadline = new Date(Date.now() + opts.deadlineMs);
      client.Unary({ message: 'node' }, { deadline }, (err, reply) => {
        if (err) {
          const code = grpc.status[err.code] || String(err.code);
          total.failed(code);
          window.failed(code);
          if (!(code in messages)) {
            messages[code] = err.details || err.message;
          }
        } else {
          total.ok(reply.instance);
          window.ok(reply.instance);
        }
        resolve();
      });
    });

  const worker = async () => {
    while (more()) {
      issued += 1;
      await call();
    }
  };

  let timer;
  if (opts.reportMs !== undefined) {
    timer = setInterval(() => {
      print({ type: 'window', t_ms: Date.now() - started, ...window.json() });
      window = new Tally();
    }, opts.reportMs);
  }

  let done = false;
  const finish = () => {
    if (done) {
      return;
    }
    done = true;
    if (timer !== undefined) {
      clearInterval(timer);
    }
    print({ type: 'summary', ...total.json(), messages });
    client.close();
    // The xDS client keeps its ADS stream (and so the event loop) alive.
    process.exit(0);
  };
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      stopping = true;
      finish();
    });
  }

  const workers = [];
  for (let i = 0; i < opts.concurrency; i += 1) {
    workers.push(worker());
  }
  Promise.all(workers).then(finish);
}

try {
  main();
} catch (e) {
  process.stderr.write(`client.js: ${e.stack || e}\n`);
  process.exit(2);
}
