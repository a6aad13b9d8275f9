// A notifyq worker in Go with pgx: the SQL worker protocol (notifyq.claim, heartbeat,
// complete, fail, hold_session, stop_worker), the same loop as examples/node-worker.
// Register handlers by task name in `tasks` below; a handler gets a context that is
// cancelled at the task's timeout, when the job is no longer ours, and at shutdown.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"math"
	mathrand "math/rand"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

// Handler runs one job; what it returns is stored as the job's result (JSON).
type Handler func(ctx context.Context, job *Job) (any, error)

// Permanent marks a failure not worth retrying: the job goes dead at once.
type Permanent struct{ Err error }

func (p Permanent) Error() string { return p.Err.Error() }

type Job struct {
	ID          int64
	Queue, Task string
	Payload     json.RawMessage
	Attempt     int32
	MaxAttempts int32
	Checkpoint  json.RawMessage // saved by an earlier attempt, or nil
	timeout     *float64
}

var tasks = map[string]Handler{
	"example.noop": func(ctx context.Context, job *Job) (any, error) { return nil, nil },
	"example.flaky": func(ctx context.Context, job *Job) (any, error) {
		if mathrand.Float64() < 1.0/3 {
			return nil, fmt.Errorf("example.flaky: attempt %d failed on purpose", job.Attempt)
		}
		return map[string]any{"attempt": job.Attempt}, nil
	},
	"example.sleep": func(ctx context.Context, job *Job) (any, error) {
		var p struct{ Ms *int }
		if err := json.Unmarshal(job.Payload, &p); err != nil {
			return nil, Permanent{err}
		}
		ms := 1000
		if p.Ms != nil {
			ms = *p.Ms
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return map[string]any{"slept": ms}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	},
}

const (
	claimSQL = `SELECT id, queue, task, payload::text, attempt, max_attempts, checkpoint::text,
	                   extract(epoch FROM timeout)::float8
	            FROM notifyq.claim($1, $2::text[], $3, make_interval(secs => $4), $5::text[])`
	heartbeatSQL = `SELECT id FROM notifyq.heartbeat($1, $2::bigint[], make_interval(secs => $3)) AS id`
	completeSQL  = `SELECT notifyq.complete($1, $2, $3::jsonb, $4)`
	failSQL      = `SELECT notifyq.fail($1, $2, $3, $4, NULL, $5)`
	// The protocol has no rescue call of its own: this is the sweep `notifyq serve` runs.
	rescueSQL = `SELECT notifyq.rescue($1, $2)`
)

type config struct {
	dsn                                     string
	queues                                  []string
	concurrency, batch                      int
	lease, poll, shutdown, rescue, poolSize float64
}

func configFromEnv() config {
	number := func(key string, fallback, min float64) float64 {
		v := os.Getenv(key)
		if v == "" {
			return fallback
		}
		n, err := strconv.ParseFloat(v, 64)
		if err != nil || n < min {
			log.Fatalf("%s must be a number >= %g, got %q", key, min, v)
		}
		return n
	}
	dsn := os.Getenv("DATABASE_URL")
	if dsn == "" {
		dsn = os.Getenv("NOTIFYQ_DSN")
	}
	if dsn == "" {
		log.Fatal("set DATABASE_URL (or NOTIFYQ_DSN) to the notifyq database")
	}
	queues := strings.Split(os.Getenv("NOTIFYQ_QUEUES"), ",")
	if queues[0] == "" {
		queues = []string{"default"}
	}
	c := int(number("NOTIFYQ_CONCURRENCY", 10, 1))
	return config{
		dsn: dsn, queues: queues, concurrency: c,
		batch:    int(math.Min(number("NOTIFYQ_BATCH", math.Min(float64(c), 100), 1), 1000)),
		lease:    number("NOTIFYQ_LEASE", 30, 1),
		poll:     number("NOTIFYQ_POLL_INTERVAL", 5, 0.01),
		shutdown: number("NOTIFYQ_SHUTDOWN_TIMEOUT", 30, 0),
		rescue:   number("NOTIFYQ_RESCUE_INTERVAL", 1, 0),
		poolSize: number("NOTIFYQ_POOL_SIZE", math.Min(float64(c), 10)+2, 2),
	}
}

type entry struct {
	job             *Job
	cancel          context.CancelFunc
	held, finishing bool
}

type worker struct {
	cfg       config
	name      string
	pool      *pgxpool.Pool
	mu        sync.Mutex
	running   map[string]*entry // by "id/attempt"
	notified  chan struct{}     // a notification came (buffered: wake-ups coalesce)
	finished  chan struct{}     // a job finished
	stopped   atomic.Bool       // handed back: write no more outcomes
	distrustU atomic.Int64      // unix ms before which the rescue distrusts free sessions
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// An error PostgreSQL raised for the statement, not one of the connection's.
func sqlError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && !strings.HasPrefix(pgErr.Code, "08") &&
		!strings.HasPrefix(pgErr.Code, "57P")
}

func (w *worker) connectionFailed(err error) {
	if !sqlError(err) {
		w.distrustU.Store(time.Now().Add(5 * time.Second).UnixMilli())
	}
}

// listen holds the dedicated connection: LISTEN, and the session lock that lets others
// rescue our jobs within seconds if this process dies.  Reconnects on failure.
func (w *worker) listen(ctx context.Context) {
	for ctx.Err() == nil {
		conn, err := pgx.Connect(ctx, w.cfg.dsn)
		if err == nil {
			err = w.hold(ctx, conn)
			conn.Close(context.Background())
		}
		if ctx.Err() != nil {
			return
		}
		log.Printf("listen connection: %v", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (w *worker) hold(ctx context.Context, conn *pgx.Conn) error {
	if _, err := conn.Exec(ctx, "LISTEN notifyq_jobs"); err != nil {
		return err
	}
	for held := false; !held; { // false while a dead session of ours is not gone yet
		if err := conn.QueryRow(ctx, "SELECT notifyq.hold_session($1)", w.name).Scan(&held); err != nil {
			return err
		}
		if !held {
			time.Sleep(time.Second)
		}
	}
	poke(w.notified) // catch up on jobs inserted while we were not listening
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return err
		}
		poke(w.notified)
	}
}

// every runs fn every `s` seconds until ctx ends, logging its errors.
func (w *worker) every(ctx context.Context, s float64, what string, fn func(context.Context) error) {
	ticker := time.NewTicker(seconds(s))
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			if err := fn(ctx); err != nil && ctx.Err() == nil {
				w.connectionFailed(err)
				log.Printf("%s failed: %v", what, err)
			}
		}
	}
}

// heartbeat renews the leases of the jobs we hold (the sign of life hold_session needs);
// a job not returned is no longer ours: its context is cancelled.
func (w *worker) heartbeat(ctx context.Context) error {
	w.mu.Lock()
	var ids []int64
	for _, e := range w.running {
		if e.held && !e.finishing {
			ids = append(ids, e.job.ID)
		}
	}
	w.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	rows, err := w.pool.Query(ctx, heartbeatSQL, w.name, ids, w.cfg.lease)
	if err != nil {
		return err
	}
	still := map[int64]bool{}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return err
		}
		still[id] = true
	}
	if err := rows.Err(); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.running {
		if e.held && !e.finishing && !still[e.job.ID] {
			log.Printf("job %d (attempt %d) is no longer ours; cancelling it", e.job.ID, e.job.Attempt)
			e.held = false
			e.cancel()
		}
	}
	return nil
}

func (w *worker) rescue(ctx context.Context) error {
	var n int64
	trust := time.Now().UnixMilli() >= w.distrustU.Load()
	if err := w.pool.QueryRow(ctx, rescueSQL, w.name, trust).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		log.Printf("rescued %d job(s) of dead workers", n)
	}
	return nil
}

func (w *worker) claim(ctx context.Context, limit int) ([]*Job, error) {
	tasksNames := make([]string, 0, len(tasks))
	for name := range tasks {
		tasksNames = append(tasksNames, name)
	}
	rows, err := w.pool.Query(ctx, claimSQL, w.name, w.cfg.queues, limit, w.cfg.lease, tasksNames)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var jobs []*Job
	for rows.Next() {
		j := &Job{}
		var payload string
		var checkpoint *string
		if err := rows.Scan(&j.ID, &j.Queue, &j.Task, &payload, &j.Attempt, &j.MaxAttempts,
			&checkpoint, &j.timeout); err != nil {
			return nil, err
		}
		j.Payload = json.RawMessage(payload)
		if checkpoint != nil {
			j.Checkpoint = json.RawMessage(*checkpoint)
		}
		jobs = append(jobs, j)
	}
	return jobs, rows.Err()
}

// write runs an outcome's statement, retried through short outages of the connection.
func (w *worker) write(sql string, dest any, args ...any) error {
	for attempt := 1; ; attempt++ {
		err := w.pool.QueryRow(context.Background(), sql, args...).Scan(dest)
		if err == nil || sqlError(err) || w.stopped.Load() || attempt >= 10 {
			return err
		}
		time.Sleep(time.Second)
	}
}

func (w *worker) start(job *Job) {
	ctx, cancel := context.WithCancel(context.Background())
	if job.timeout != nil {
		ctx, cancel = context.WithTimeout(ctx, seconds(*job.timeout))
	}
	e := &entry{job: job, cancel: cancel, held: true}
	key := fmt.Sprintf("%d/%d", job.ID, job.Attempt)
	w.mu.Lock()
	w.running[key] = e
	w.mu.Unlock()
	go func() {
		defer func() {
			w.mu.Lock()
			delete(w.running, key)
			w.mu.Unlock()
			cancel()
			poke(w.finished)
		}()
		result, err := run(ctx, job)
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("timed out after %g s", *job.timeout)
		}
		w.mu.Lock()
		e.finishing = true
		w.mu.Unlock()
		if !w.stopped.Load() {
			w.finish(job, result, err)
		}
	}()
}

func run(ctx context.Context, job *Job) (result any, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return tasks[job.Task](ctx, job)
}

func (w *worker) finish(job *Job, result any, failure error) {
	if failure == nil {
		var text *string // nil: the result is SQL NULL
		if result != nil {
			if b, err := json.Marshal(result); err != nil {
				failure = Permanent{err}
			} else {
				s := string(b)
				text = &s
			}
		}
		if failure == nil {
			var ok bool
			err := w.write(completeSQL, &ok, job.ID, w.name, text, job.Attempt)
			if err == nil && !ok {
				log.Printf("job %d succeeded too late: not ours now", job.ID)
			}
			if err == nil || !sqlError(err) {
				w.lostIf(job, err)
				return
			}
			failure = Permanent{err} // over 1 MiB
		}
	}
	var permanent Permanent
	retryable := !errors.As(failure, &permanent)
	var status *string
	err := w.write(failSQL, &status, job.ID, w.name, failure.Error(), retryable, job.Attempt)
	if err == nil {
		what := "too late: not ours now"
		if status != nil {
			what = *status
		}
		log.Printf("job %d attempt %d failed: %s", job.ID, job.Attempt, what)
	}
	w.lostIf(job, err)
}

func (w *worker) lostIf(job *Job, err error) {
	if err != nil {
		log.Printf("job %d: outcome not written (%v); it will be rescued", job.ID, err)
	}
}

func (w *worker) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.running)
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("notifyq-go: ")
	os.Exit(serve(configFromEnv()))
}

func serve(cfg config) int {
	host, _ := os.Hostname()
	suffix := make([]byte, 4)
	rand.Read(suffix)
	w := &worker{
		cfg:      cfg,
		name:     fmt.Sprintf("%s:%d:%s", host, os.Getpid(), hex.EncodeToString(suffix)),
		running:  map[string]*entry{},
		notified: make(chan struct{}, 1),
		finished: make(chan struct{}, 1),
	}
	poolConfig, err := pgxpool.ParseConfig(cfg.dsn)
	if err != nil {
		log.Fatal(err)
	}
	poolConfig.MaxConns = int32(cfg.poolSize)
	// As `notifyq serve`'s connections: no JIT for the claim (its estimated cost grows with
	// the backlog), and generic plans (custom ones cost more to plan than to run).
	poolConfig.ConnConfig.RuntimeParams["jit"] = "off"
	poolConfig.ConnConfig.RuntimeParams["plan_cache_mode"] = "force_generic_plan"
	if w.pool, err = pgxpool.ConnectConfig(context.Background(), poolConfig); err != nil {
		log.Fatal(err)
	}
	defer w.pool.Close()
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	background, stopBackground := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, fn := range []func(){
		func() { w.listen(background) },
		func() { w.every(background, 1, "heartbeat", w.heartbeat) },
		func() {
			if cfg.rescue > 0 {
				w.every(background, cfg.rescue, "rescue", w.rescue)
			}
		},
	} {
		wg.Add(1)
		go func(fn func()) { defer wg.Done(); fn() }(fn)
	}
	log.Printf("worker %s: queues %v, concurrency %d", w.name, cfg.queues, cfg.concurrency)

	// Claim in batches while there is room and work, else wait for a notification, a
	// finished job or the fallback poll.
	wanted, nextPoll := true, time.Now()
	for stopping := false; !stopping; {
		if room := cfg.concurrency - w.count(); wanted && room > 0 {
			wanted, nextPoll = false, time.Now().Add(seconds(cfg.poll))
			jobs, err := w.claim(context.Background(), int(math.Min(float64(room), float64(cfg.batch))))
			if err != nil {
				w.connectionFailed(err)
				log.Printf("claim failed: %v", err)
				time.Sleep(time.Second)
			}
			for _, job := range jobs {
				w.start(job)
			}
			wanted = wanted || len(jobs) > 0
			continue
		}
		timer := time.NewTimer(time.Until(nextPoll))
		select {
		case <-w.notified:
			wanted = true
		case <-w.finished:
			wanted = true // the room it frees may be in a capped queue
		case <-timer.C:
			wanted = true
		case sig := <-signals:
			log.Printf("%v: no more claims; %d running job(s) get %g s", sig, w.count(), cfg.shutdown)
			stopping = true
		}
		timer.Stop()
	}

	// Shutdown: running jobs get the grace period, then the rest is handed back.
	grace := time.After(seconds(cfg.shutdown))
wait:
	for w.count() > 0 {
		select {
		case <-w.finished:
		case <-grace:
			break wait
		case <-signals:
			log.Print("second signal: exiting now; running jobs will be rescued")
			stopBackground()
			return 1
		}
	}
	return w.stop(stopBackground, &wg)
}

func (w *worker) stop(stopBackground context.CancelFunc, wg *sync.WaitGroup) int {
	var handed int32
	code := 0
	if err := w.pool.QueryRow(context.Background(), "SELECT notifyq.stop_worker($1)", w.name).Scan(&handed); err != nil {
		log.Printf("stop_worker failed (%v); running jobs will be rescued", err)
		code = 1
	} else {
		log.Printf("stopped; %d job(s) handed back", handed)
	}
	w.stopped.Store(true)
	w.mu.Lock()
	for _, e := range w.running {
		e.cancel()
	}
	w.mu.Unlock()
	stopBackground()
	wg.Wait()
	return code
}
