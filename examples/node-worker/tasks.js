// Example handlers, and the entry point: `node tasks.js` (see README.md).
// A handler is `async (payload, job) => result`; register it under its task name.
import { setTimeout as sleep } from "node:timers/promises";
import { runWorker } from "./worker.js";

const tasks = {
  // Does nothing: the cheapest job there is (the benchmark drains these).
  "example.noop": async () => {},

  // Fails about one attempt in three (payload.failRate to change that); retried with the
  // task's backoff, dead after max_attempts.
  "example.flaky": async (payload, job) => {
    if (Math.random() < (payload.failRate ?? 1 / 3)) {
      throw new Error(`example.flaky: attempt ${job.attempt} failed on purpose`);
    }
    return { attempt: job.attempt };
  },

  // Sleeps payload.ms milliseconds, reporting progress; stops early when job.signal aborts
  // (timeout, shutdown, or the job is no longer ours).
  "example.sleep": async (payload, job) => {
    await job.progress(0, "sleeping");
    await sleep(payload.ms ?? 1000, undefined, { signal: job.signal });
    return { slept: payload.ms ?? 1000 };
  },
};

process.exit(await runWorker(tasks));
