// A notifyq worker for Node.js: the SQL worker protocol (notifyq.claim, heartbeat,
// complete, fail, progress, hold_session, stop_worker) with the standard `pg` client.
// Copy this file; register handlers by task name (see tasks.js):
//
//   await runWorker({ "email.send": async (payload, job) => { ... } });
//
// A handler gets the job's payload and a context (id, queue, task, attempt, maxAttempts,
// checkpoint, signal, progress(), saveCheckpoint()); what it returns is stored as the
// job's result.  A throw is a failure, retried under the task's policy (notifyq.tasks);
// throw an error with `retryable = false` to make the job dead at once, or with
// `retryIn = seconds` to choose the delay.  `signal` aborts when the task's timeout
// passes, when the job is no longer ours, and at shutdown: long handlers should honour it.
import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import pg from "pg";

const CLAIM = `
  SELECT id, queue, task, payload, attempt, max_attempts, checkpoint,
         extract(epoch FROM timeout)::float8 AS timeout
  FROM notifyq.claim($1, $2::text[], $3, make_interval(secs => $4), $5::text[])`;
const HEARTBEAT = `
  SELECT id FROM notifyq.heartbeat($1, $2::bigint[], make_interval(secs => $3)) AS id`;
const COMPLETE = `
  SELECT c.id, notifyq.complete(c.id, $1, c.result, c.attempt) AS ok
  FROM unnest($2::bigint[], $3::jsonb[], $4::int[]) AS c(id, result, attempt)`;
const FAIL = "SELECT notifyq.fail($1, $2, $3, $4, make_interval(secs => $5), $6) AS status";
const PROGRESS = "SELECT notifyq.progress($1, $2, $3, $4, $5::jsonb, $6) AS ok";
// The sweep `notifyq serve` runs, so a deployment of SQL workers alone still gets a dead
// worker's jobs back.
const RESCUE = "SELECT notifyq.rescue($1, $2) AS rescued";

// An error PostgreSQL raised for the statement, not one of the connection's.
const sqlError = (err) => /^[0-9A-Z]{5}$/.test(err.code ?? "") && !/^(08|57P)/.test(err.code);

export function configFromEnv(env = process.env) {
  const number = (key, fallback, min = 0) => {
    const value = env[key] ? Number(env[key]) : fallback;
    if (!Number.isFinite(value) || value < min) {
      throw new Error(`${key} must be a number >= ${min}, got ${env[key]}`);
    }
    return value;
  };
  const dsn = env.DATABASE_URL || env.NOTIFYQ_DSN;
  if (!dsn) throw new Error("set DATABASE_URL (or NOTIFYQ_DSN) to the notifyq database");
  const concurrency = Math.floor(number("NOTIFYQ_CONCURRENCY", 10, 1));
  return {
    dsn,
    queues: (env.NOTIFYQ_QUEUES || "default").split(",").map((q) => q.trim()).filter(Boolean),
    concurrency,
    batch: Math.min(Math.floor(number("NOTIFYQ_BATCH", Math.min(concurrency, 100), 1)), 1000),
    lease: number("NOTIFYQ_LEASE", 30, 1), // seconds a claim holds without a heartbeat
    pollInterval: number("NOTIFYQ_POLL_INTERVAL", 5, 0.01), // fallback when no notification comes
    shutdownTimeout: number("NOTIFYQ_SHUTDOWN_TIMEOUT", 30), // grace for running jobs
    poolSize: Math.floor(number("NOTIFYQ_POOL_SIZE", Math.min(concurrency, 10) + 2, 2)),
    rescueInterval: number("NOTIFYQ_RESCUE_INTERVAL", 1), // 0: leave rescue to others
    debug: env.NOTIFYQ_LOG_LEVEL === "debug",
  };
}

export async function runWorker(handlers, config = configFromEnv()) {
  const name = `${hostname()}:${process.pid}:${randomBytes(4).toString("hex")}`;
  const tasks = Object.keys(handlers);
  const log = (level, message) => {
    if (level !== "debug" || config.debug) {
      console.error(`${new Date().toISOString()} ${level} notifyq-node: ${message}`);
    }
  };
  const pool = new pg.Pool({
    connectionString: config.dsn,
    max: config.poolSize,
    application_name: "notifyq-node",
    // As `notifyq serve`'s connections: the claim's estimated cost grows with the backlog,
    // and past jit_above_cost every claim would be compiled (tens of ms, for a few index
    // probes); custom plans cost notifyq.complete more in planning than in running.
    options: "-c jit=off -c plan_cache_mode=force_generic_plan",
  });
  // After a failover every session lock is free for a moment: the rescue trusts sessions
  // again only 5 s after our own connections last failed, as `notifyq serve` does.
  let trustSessionsAt = 0;
  const connectionFailed = (err) => {
    if (!sqlError(err)) trustSessionsAt = Date.now() + 5000;
  };
  pool.on("error", (err) => {
    connectionFailed(err);
    log("warn", `idle connection failed: ${err.message}`);
  });

  const running = new Map(); // `${id}/${attempt}` -> { job, controller, held, finishing }
  let stopping = false; // no more claims
  let stopped = false; // handed back: write nothing more
  let wanted = true; // a claim may find work: at start, after a notification or a poll
  let wakeUp = null;
  const wake = () => wakeUp?.();
  const waitForWake = (ms) =>
    new Promise((resolve) => {
      const timer = setTimeout(done, Math.max(ms, 0));
      function done() {
        clearTimeout(timer);
        wakeUp = null;
        resolve();
      }
      wakeUp = done;
    });

  // The dedicated connection: LISTEN for new jobs, and hold the session lock that lets
  // others rescue our jobs within seconds if this process dies.  Reconnects on failure.
  let listener = null;
  async function listen() {
    while (!stopping) {
      const client = new pg.Client({
        connectionString: config.dsn,
        application_name: "notifyq-node:listen",
      });
      listener = client;
      client.on("notification", () => {
        wanted = true;
        wake();
      });
      client.on("error", (err) => log("warn", `listen connection: ${err.message}`));
      const ended = new Promise((resolve) => client.once("end", resolve));
      try {
        await client.connect();
        await client.query("LISTEN notifyq_jobs");
        // False while a session of ours that died is not gone yet on the server.
        while (!(await client.query("SELECT notifyq.hold_session($1) AS ok", [name])).rows[0].ok) {
          await sleep(1000);
        }
        wanted = true; // catch up on jobs inserted while we were not listening
        wake();
        await ended;
      } catch (err) {
        log("warn", `listen connection: ${err.message}`);
      }
      client.end().catch(() => {});
      if (!stopping) await sleep(1000);
    }
  }

  // Once a second while we hold jobs: renew their leases (this is also the sign of life
  // hold_session needs); a job not returned is no longer ours (rescued, cancelled).
  async function heartbeat() {
    const held = [...running.values()].filter((r) => r.held && !r.finishing);
    if (held.length === 0) return;
    const ids = [...new Set(held.map((r) => r.job.id))];
    const { rows } = await pool.query(HEARTBEAT, [name, ids, config.lease]);
    const still = new Set(rows.map((r) => r.id));
    for (const r of held) {
      if (!still.has(r.job.id) && !r.finishing) {
        log("warn", `job ${r.job.id} (attempt ${r.job.attempt}) is no longer ours; aborting it`);
        r.held = false;
        r.controller.abort(new Error("the job is no longer this worker's"));
      }
    }
  }

  async function rescue() {
    const { rows } = await pool.query(RESCUE, [name, Date.now() >= trustSessionsAt]);
    if (rows[0].rescued > 0) log("info", `rescued ${rows[0].rescued} job(s) of dead workers`);
  }

  function every(seconds, what, fn) {
    let busy = false;
    return setInterval(async () => {
      if (busy) return;
      busy = true;
      try {
        await fn();
      } catch (err) {
        connectionFailed(err);
        log("warn", `${what} failed: ${err.message}`);
      } finally {
        busy = false;
      }
    }, seconds * 1000);
  }

  // Outcome writes outlive short outages: retried while the error is the connection's.
  async function write(sql, params) {
    for (let attempt = 1; ; attempt++) {
      try {
        return (await pool.query(sql, params)).rows;
      } catch (err) {
        if (sqlError(err) || stopped || attempt >= 10) throw err;
        await sleep(1000);
      }
    }
  }

  // Successes are written in batches: one statement, and one commit, for all the jobs
  // that finished while the previous batch was being written.
  const successes = []; // { job, json, resolve, reject }
  let flushing = false;
  function complete(job, json) {
    const written = new Promise((resolve, reject) => {
      successes.push({ job, json, resolve, reject });
    });
    if (!flushing) flush();
    return written;
  }
  async function flush() {
    flushing = true;
    while (successes.length > 0) await completeBatch(successes.splice(0, 500));
    flushing = false;
  }
  async function completeBatch(batch) {
    batch.sort((a, b) => (BigInt(a.job.id) < BigInt(b.job.id) ? -1 : 1)); // rows lock in id order
    const columns = [batch.map((s) => s.job.id), batch.map((s) => s.json)];
    try {
      const rows = await write(COMPLETE, [name, ...columns, batch.map((s) => s.job.attempt)]);
      const ok = new Set(rows.filter((r) => r.ok).map((r) => r.id));
      for (const s of batch) s.resolve(ok.has(s.job.id));
    } catch (err) {
      if (batch.length > 1 && sqlError(err)) {
        for (const s of batch) await completeBatch([s]); // one result refused: find it
      } else {
        for (const s of batch) s.reject(err);
      }
    }
  }

  async function run(entry) {
    const { job, controller } = entry;
    const context = {
      id: job.id,
      queue: job.queue,
      task: job.task,
      attempt: job.attempt,
      maxAttempts: job.max_attempts,
      checkpoint: job.checkpoint,
      signal: controller.signal,
      progress: (percent, message = null) =>
        pool.query(PROGRESS, [job.id, name, percent, message, null, job.attempt]),
      saveCheckpoint: (value) =>
        pool.query(PROGRESS, [job.id, name, null, null, JSON.stringify(value), job.attempt]),
    };
    let timer;
    const timeout = new Promise((_, reject) => {
      if (!job.timeout) return;
      timer = setTimeout(() => {
        const err = new Error(`timed out after ${job.timeout} s`);
        controller.abort(err);
        reject(err);
      }, job.timeout * 1000);
    });
    let result, failure;
    try {
      result = await Promise.race([handlers[job.task](job.payload, context), timeout]);
    } catch (err) {
      failure = err ?? new Error("failed");
    } finally {
      clearTimeout(timer);
    }
    entry.finishing = true;
    if (stopped) return; // handed back meanwhile: the outcome is not ours to write
    if (failure === undefined) {
      try {
        const json = result === undefined ? null : JSON.stringify(result);
        const ok = await complete(job, json);
        log(ok ? "debug" : "warn", `job ${job.id} succeeded${ok ? "" : " too late: not ours now"}`);
        return;
      } catch (err) {
        if (!sqlError(err) && !(err instanceof TypeError)) return lost(job, err);
        failure = Object.assign(err, { retryable: false }); // not JSON, or over 1 MiB
      }
    }
    const retryable = failure.retryable !== false;
    const retryIn = typeof failure.retryIn === "number" ? failure.retryIn : null;
    const error = String(failure.stack ?? failure);
    try {
      const params = [job.id, name, error, retryable, retryIn, job.attempt];
      const [{ status }] = await write(FAIL, params);
      const what = status ?? "too late: not ours now";
      log(status ? "info" : "warn", `job ${job.id} attempt ${job.attempt} failed: ${what}`);
    } catch (err) {
      lost(job, err);
    }
  }

  function lost(job, err) {
    log("error", `job ${job.id}: outcome not written (${err.message}); it will be rescued`);
  }

  function start(job) {
    const key = `${job.id}/${job.attempt}`;
    const entry = { job, controller: new AbortController(), held: true, finishing: false };
    running.set(key, entry);
    run(entry).finally(() => {
      running.delete(key);
      wanted = true; // the room it frees may be in a capped queue
      wake();
    });
  }

  const onSignal = (signal) => {
    if (stopping) {
      log("warn", `second ${signal}: exiting now; running jobs will be rescued`);
      process.exit(1);
    }
    const grace = `${running.size} running job(s) get ${config.shutdownTimeout} s to finish`;
    log("info", `${signal}: no more claims; ${grace}`);
    stopping = true;
    wake();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);

  const listening = listen();
  const timers = [every(1, "heartbeat", heartbeat)];
  if (config.rescueInterval > 0) timers.push(every(config.rescueInterval, "rescue", rescue));
  const serving = `queues ${config.queues}, tasks ${tasks}, concurrency ${config.concurrency}`;
  log("info", `worker ${name}: ${serving}`);

  // Claim in batches while there is room and work, else wait for a notification, a free
  // slot or the fallback poll.
  let nextPoll = 0;
  while (!stopping) {
    const room = config.concurrency - running.size;
    if (wanted && room > 0) {
      wanted = false; // a notification during the claim sets it again
      nextPoll = Date.now() + config.pollInterval * 1000;
      try {
        const limit = Math.min(room, config.batch);
        const { rows } = await pool.query(CLAIM, [name, config.queues, limit, config.lease, tasks]);
        for (const job of rows) start(job);
        if (rows.length > 0) wanted = true; // more may be ready: claim again while there is room
        log("debug", `claimed ${rows.length} job(s)`);
      } catch (err) {
        connectionFailed(err);
        log("warn", `claim failed: ${err.message}`);
        await waitForWake(1000);
      }
      continue;
    }
    await waitForWake(nextPoll - Date.now());
    if (Date.now() >= nextPoll) wanted = true;
  }

  // Shutdown: let running jobs finish for the grace period, then hand back the rest.
  const deadline = Date.now() + config.shutdownTimeout * 1000;
  while (running.size > 0 && Date.now() < deadline) await waitForWake(deadline - Date.now());
  let code = 0;
  try {
    const { rows } = await pool.query("SELECT notifyq.stop_worker($1) AS handed_back", [name]);
    log("info", `stopped; ${rows[0].handed_back} job(s) handed back`);
  } catch (err) {
    log("error", `stop_worker failed (${err.message}); running jobs will be rescued`);
    code = 1;
  }
  stopped = true;
  for (const r of running.values()) r.controller.abort(new Error("worker shut down"));
  timers.forEach(clearInterval);
  await listener?.end().catch(() => {});
  await listening;
  await pool.end();
  return code;
}
