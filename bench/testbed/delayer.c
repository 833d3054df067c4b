/* The testbed's packet delayer in C: the same contract as delayer.py (NFQUEUE, one-way
 * delay +- uniform jitter per queue, a packet never overtakes the one before it), at a
 * fraction of its CPU per packet: packets are read until the socket is empty, only their
 * metadata is copied (no payload), GSO packets stay whole, and the packets whose time has
 * come are released with one batch verdict per queue (the kernel numbers a queue's packets
 * in order, and they leave in order, so "accept everything up to id N" is exact).
 *
 *     enorm-delayer [--control] NUM:DELAY_MS:JITTER_MS [NUM:DELAY_MS:JITTER_MS ...]
 *
 * With --control, a line NUM:DELAY_MS:JITTER_MS on stdin sets that queue's delay from
 * then on (a user walking away from a node: later packets wait longer; order is still
 * kept, so a shorter delay makes no packet overtake one held before it).
 * Runs at the lowest real-time priority (SCHED_FIFO 1) where it may, so that a loaded
 * machine does not stretch the delay. Prints "ready" once every queue is bound; on
 * SIGTERM or SIGINT lets what it holds go (accepts it, never drops it), prints how late
 * the packets left against their due time (`late packets=N mean_us= p99_us= max_us=`)
 * and exits. Built on first use by bench/testbed/delayer.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define MAX_QUEUES 16
#define RING 65536 /* = the kernel queue's max length: the ring cannot overflow */

struct held {
    uint32_t id;
    int64_t due_ns;
};

struct link {
    struct nfq_q_handle *qh;
    int num;
    int64_t delay_ns, jitter_ns, last_due;
    struct held ring[RING];
    uint32_t head, tail; /* held packets: ring[head .. tail) */
};

static struct link links[MAX_QUEUES];
static int nlinks;
/* how late packets leave against their due time: count, sum, max, log2 buckets of us */
static uint64_t late_n, late_buckets[32];
static int64_t late_sum_ns, late_max_ns;
static volatile sig_atomic_t stopping;
static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double uniform(void) { /* xorshift64*: [0, 1) */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
                     void *data) {
    struct link *l = data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    (void)qh;
    (void)msg;
    if (!ph)
        return 0;
    int64_t due = now_ns() + l->delay_ns;
    if (l->jitter_ns)
        due += (int64_t)((2.0 * uniform() - 1.0) * (double)l->jitter_ns);
    if (due < l->last_due)
        due = l->last_due; /* order kept */
    l->last_due = due;
    struct held *h = &l->ring[l->tail++ % RING];
    h->id = ntohl(ph->packet_id);
    h->due_ns = due;
    return 0;
}

/* Accept every held packet due by `now` (all of them when now < 0). */
static void release(int64_t now) {
    for (int i = 0; i < nlinks; i++) {
        struct link *l = &links[i];
        uint32_t last = l->head;
        while (l->head != l->tail && (now < 0 || l->ring[l->head % RING].due_ns <= now)) {
            if (now >= 0) {
                int64_t late = now - l->ring[l->head % RING].due_ns;
                int b = 0;
                for (int64_t us = late / 1000; us > 0 && b < 31; us >>= 1)
                    b++;
                late_n++, late_buckets[b]++, late_sum_ns += late;
                if (late > late_max_ns)
                    late_max_ns = late;
            }
            l->head++;
        }
        if (l->head != last)
            nfq_set_verdict_batch(l->qh, l->ring[(l->head - 1) % RING].id, NF_ACCEPT);
    }
}

static int64_t next_due(void) {
    int64_t next = -1;
    for (int i = 0; i < nlinks; i++) {
        struct link *l = &links[i];
        if (l->head != l->tail && (next < 0 || l->ring[l->head % RING].due_ns < next))
            next = l->ring[l->head % RING].due_ns;
    }
    return next;
}

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static int parse(const char *spec, struct link *l) {
    double delay, jitter;
    if (sscanf(spec, "%d:%lf:%lf", &l->num, &delay, &jitter) != 3 || l->num < 0 ||
        l->num > 65535 || delay < 0 || jitter < 0)
        return -1;
    l->delay_ns = (int64_t)(delay * 1e6);
    l->jitter_ns = (int64_t)(jitter * 1e6);
    return 0;
}

/* A control line: "NUM:DELAY_MS:JITTER_MS" for a queue this delayer holds. */
static void control_line(const char *line) {
    struct link parsed;
    if (parse(line, &parsed) < 0) {
        fprintf(stderr, "delayer: control line %s: expected NUM:DELAY_MS:JITTER_MS\n", line);
        return;
    }
    for (int i = 0; i < nlinks; i++)
        if (links[i].num == parsed.num) {
            links[i].delay_ns = parsed.delay_ns;
            links[i].jitter_ns = parsed.jitter_ns;
            return;
        }
    fprintf(stderr, "delayer: control line %s: no such queue\n", line);
}

/* Read what stdin has; returns -1 at its end (no more control). */
static int control_read(void) {
    static char line[256];
    static size_t len;
    char chunk[1024];
    ssize_t n = read(0, chunk, sizeof chunk);
    if (n <= 0)
        return n < 0 && errno == EINTR ? 0 : -1;
    for (ssize_t i = 0; i < n; i++) {
        if (chunk[i] == '\n') {
            line[len] = 0;
            if (len)
                control_line(line);
            len = 0;
        } else if (len < sizeof line - 1) {
            line[len++] = chunk[i];
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    int control = argc > 1 && strcmp(argv[1], "--control") == 0;
    if (control)
        argc--, argv++;
    if (argc < 2 || argc - 1 > MAX_QUEUES) {
        fprintf(stderr, "usage: %s [--control] NUM:DELAY_MS:JITTER_MS ... (1 to %d queues)\n",
                argv[0], MAX_QUEUES);
        return 2;
    }
    struct nfq_handle *h = nfq_open();
    if (!h) {
        perror("delayer: nfq_open");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        struct link *l = &links[nlinks++];
        if (parse(argv[i], l) < 0) {
            fprintf(stderr, "delayer: queue %s: expected NUM:DELAY_MS:JITTER_MS\n", argv[i]);
            return 2;
        }
        l->qh = nfq_create_queue(h, l->num, on_packet, l);
        if (!l->qh) {
            fprintf(stderr, "delayer: cannot bind queue %d (another process holds it?)\n",
                    l->num);
            return 1;
        }
        if (nfq_set_mode(l->qh, NFQNL_COPY_META, 0) < 0 ||
            nfq_set_queue_maxlen(l->qh, RING) < 0) {
            fprintf(stderr, "delayer: cannot configure queue %d\n", l->num);
            return 1;
        }
        nfq_set_queue_flags(l->qh, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO); /* old kernels: ignored */
    }
    nfnl_rcvbufsiz(nfq_nfnlh(h), 16 << 20);
    int fd = nfq_fd(h);
    rng ^= (uint64_t)now_ns();
    prctl(PR_SET_TIMERSLACK, 1000UL); /* wake within 1 us of the due time, not 50 us */
    /* A link does not wait for a CPU: the lowest real-time priority lets a due packet
     * leave when the machine is busy with the servers (the delayer's own work is a few
     * microseconds a packet; the kernel's RT throttling bounds it anyway). Best effort. */
    struct sched_param sp = {.sched_priority = 1};
    sched_setscheduler(0, SCHED_FIFO, &sp);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("ready\n");
    fflush(stdout);

    static char buf[65536] __attribute__((aligned));
    struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN}, {.fd = control ? 0 : -1,
                                                         .events = POLLIN}};
    while (!stopping) {
        int64_t now = now_ns();
        release(now);
        int64_t next = next_due();
        struct timespec ts = {0, 200000000}; /* nothing held: look again in 0.2 s */
        if (next >= 0) {
            int64_t wait = next - now_ns();
            if (wait < 0)
                wait = 0;
            ts.tv_sec = wait / 1000000000;
            ts.tv_nsec = wait % 1000000000;
        }
        if (ppoll(pfd, 2, &ts, NULL) <= 0)
            continue; /* timeout, or a signal */
        if (pfd[1].revents && control_read() < 0)
            pfd[1].fd = -1; /* stdin closed: the delays stay as they are */
        for (;;) {
            ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0) {
                nfq_handle_packet(h, buf, (int)n);
                continue;
            }
            if (n < 0 && errno == ENOBUFS)
                continue; /* the kernel dropped messages: the packets stay queued and
                             leave with the next batch verdict */
            break;
        }
    }
    release(-1);
    /* p99 as the upper bound of its log2 bucket */
    uint64_t seen = 0, p99 = 0;
    for (int b = 0; b < 32 && late_n; b++) {
        seen += late_buckets[b];
        if (seen * 100 >= late_n * 99) {
            p99 = b ? 1ULL << b : 1;
            break;
        }
    }
    printf("late packets=%llu mean_us=%.1f p99_us=%llu max_us=%.1f\n",
           (unsigned long long)late_n, late_n ? late_sum_ns / 1e3 / late_n : 0.0,
           (unsigned long long)p99, late_max_ns / 1e3);
    fflush(stdout);
    for (int i = 0; i < nlinks; i++)
        nfq_destroy_queue(links[i].qh);
    nfq_close(h);
    return 0;
}
