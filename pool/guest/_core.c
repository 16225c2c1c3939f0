/* The compiled core of pool.guest.buddy.PageAllocator: the hot paths of mm/page_alloc.c
 * (Linux 6.1) over the allocator's own per-pfn arrays, and the churn's step loop
 * (pool.guest.workload.Churn.step).
 *
 * Why: the model is interpreter-bound (aging a 64 GiB guest runs tens of millions of list
 * operations). This file is a line-by-line translation of the pure-Python reference in
 * buddy.py (every function names the method it translates, which names the kernel
 * function); tests/test_buddy_differential.py drives both with the same random operation
 * sequences and asserts identical lists, counters and per-pfn states.
 *
 * Data: nothing is owned here. A Core holds buffer views of the PageAllocator's arrays
 * (state, mt, pageblock mt: bytes; next/prev: int32 list links, list heads after end_pfn;
 * nr_free [zones x 11], free_pages [zones], counters [allocated], pcp [zones x cpus x 5]:
 * int64), so the Python methods that are not compiled (queries, check_invariants,
 * claim_range, clone) see exactly what the compiled ones wrote.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_ORDER 10
#define NR_ORDERS 11
#define MIGRATE_UNMOVABLE 0
#define MIGRATE_MOVABLE 1
#define MIGRATE_RECLAIMABLE 2
#define MIGRATE_PCPTYPES 3
#define PAGEBLOCK_ORDER 9
#define PAGEBLOCK_NR_PAGES (1 << PAGEBLOCK_ORDER)
#define COSTLY_ORDER 3
#define NR_LOWORDER_PCP_LISTS 12
#define NR_PCP_LISTS 13
#define S_FREE 1
#define S_PCP 16
#define S_ALLOC 32
#define S_FREE_LAST (S_FREE + MAX_ORDER)
#define S_PCP_LAST (S_PCP + MAX_ORDER)
#define MERGE_LIKELY_MAX (MAX_ORDER - 1)
#define MAX_ZONES 8
/* pcp record fields (pool.guest.pcp.PerCpuPages) */
#define P_FIRST 0
#define P_HIGH 1
#define P_BATCH 2
#define P_COUNT 3
#define P_FF 4
#define P_FIELDS 5

static const int FALLBACKS[3][2] = {
    {MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE},
    {MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE},
    {MIGRATE_UNMOVABLE, MIGRATE_MOVABLE},
};

typedef struct {
    PyObject_HEAD
    Py_buffer views[9];
    int nviews;
    uint8_t *state, *mt, *pbm;
    int32_t *next, *prev;
    int64_t *nr_free, *free_pages, *counters, *pcp;
    int64_t end_pfn;
    int nzones, cpus;
    int64_t zone_start[MAX_ZONES], zone_end[MAX_ZONES], low_wmark[MAX_ZONES];
} Core;

/* ------------------------------------------------------------------ list primitives */

static inline void list_add(Core *c, int64_t pfn, int64_t head) {
    int32_t first = c->next[head];
    c->next[pfn] = first;
    c->prev[pfn] = (int32_t)head;
    c->prev[first] = (int32_t)pfn;
    c->next[head] = (int32_t)pfn;
}

static inline void list_add_tail(Core *c, int64_t pfn, int64_t head) {
    int32_t last = c->prev[head];
    c->next[pfn] = (int32_t)head;
    c->prev[pfn] = last;
    c->next[last] = (int32_t)pfn;
    c->prev[head] = (int32_t)pfn;
}

static inline void list_del(Core *c, int64_t pfn) {
    int32_t n = c->next[pfn], p = c->prev[pfn];
    c->next[p] = n;
    c->prev[n] = p;
}

static inline int64_t buddy_list(Core *c, int zi, int mt, int order) {
    return c->end_pfn + (int64_t)(zi * MIGRATE_PCPTYPES + mt) * NR_ORDERS + order;
}

static inline int64_t *pcp_of(Core *c, int zi, int cpu) {
    return c->pcp + ((int64_t)zi * c->cpus + cpu) * P_FIELDS;
}

static int zone_of(Core *c, int64_t pfn) {
    for (int zi = c->nzones - 1; zi >= 0; zi--) {
        if (pfn >= c->zone_start[zi]) return pfn < c->zone_end[zi] ? zi : -1;
    }
    return -1;
}

/* PageAllocator._block_containing: head of the block holding pfn (state byte in *value),
 * or -1. */
static int64_t block_containing(Core *c, int64_t pfn, int *value) {
    if (pfn < 0 || pfn >= c->end_pfn) return -1;
    for (int order = 0; order < NR_ORDERS; order++) {
        int64_t head = pfn & ~(((int64_t)1 << order) - 1);
        int v = c->state[head];
        if (v) {
            int base = v <= S_FREE_LAST ? S_FREE : v <= S_PCP_LAST ? S_PCP : S_ALLOC;
            int64_t size = (int64_t)1 << (v - base);
            if (pfn < head + size) {
                *value = v;
                return head;
            }
            return -1;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------ the kernel's paths */

/* _rmqueue_smallest: __rmqueue_smallest() + expand() */
static int64_t rmqueue_smallest(Core *c, int zi, int order, int mt) {
    int64_t base = buddy_list(c, zi, mt, 0);
    int32_t *nxt = c->next, *prv = c->prev;
    int64_t *nr_free = c->nr_free + zi * NR_ORDERS;
    for (int current = order; current < NR_ORDERS; current++) {
        int64_t head = base + current;
        int64_t pfn = nxt[head];
        if (pfn == head) continue;
        int32_t n = nxt[pfn];
        nxt[head] = n;
        prv[n] = (int32_t)head;
        nr_free[current]--;
        while (current > order) {
            current--;
            int64_t upper = pfn + ((int64_t)1 << current);
            list_add(c, upper, base + current);
            nr_free[current]++;
            c->state[upper] = (uint8_t)(S_FREE + current);
        }
        c->state[pfn] = 0;
        c->mt[pfn] = (uint8_t)mt;
        return pfn;
    }
    return -1;
}

static int can_steal_fallback(int order, int start_mt) {
    if (order >= PAGEBLOCK_ORDER) return 1;
    return order >= PAGEBLOCK_ORDER / 2 || start_mt == MIGRATE_RECLAIMABLE ||
           start_mt == MIGRATE_UNMOVABLE;
}

/* _find_suitable_fallback */
static int find_suitable_fallback(Core *c, int zi, int order, int mt, int *can_steal) {
    *can_steal = 0;
    if (!c->nr_free[zi * NR_ORDERS + order]) return -1;
    for (int i = 0; i < 2; i++) {
        int fmt = FALLBACKS[mt][i];
        int64_t head = buddy_list(c, zi, fmt, order);
        if (c->next[head] != head) {
            *can_steal = can_steal_fallback(order, mt);
            return fmt;
        }
    }
    return -1;
}

/* _move_freepages_block: move_freepages_block(); returns pages moved, *movable_out */
static int64_t move_freepages_block(Core *c, int zi, int64_t pfn, int mt, int64_t *movable_out) {
    int64_t start = pfn & ~((int64_t)PAGEBLOCK_NR_PAGES - 1);
    int64_t end = start + PAGEBLOCK_NR_PAGES - 1;
    *movable_out = 0;
    if (start < c->zone_start[zi]) start = pfn;
    if (end >= c->zone_end[zi]) return 0;
    int64_t moved = 0, movable = 0;
    int64_t p = start;
    while (p <= end) {
        int value = c->state[p];
        if (value >= S_FREE && value <= S_FREE_LAST) {
            int order = value - S_FREE;
            list_del(c, p);
            list_add_tail(c, p, buddy_list(c, zi, mt, order));
            p += (int64_t)1 << order;
            moved += (int64_t)1 << order;
        } else if (value >= S_ALLOC) {
            int64_t size = (int64_t)1 << (value - S_ALLOC);
            if (c->mt[p] == MIGRATE_MOVABLE) {
                int64_t rest = end + 1 - p;
                movable += size < rest ? size : rest;
            }
            p += size;
        } else if (value >= S_PCP) {
            p += (int64_t)1 << (value - S_PCP);
        } else {
            int v;
            int64_t head = block_containing(c, p, &v);
            if (head < 0) {
                p += 1;
                continue;
            }
            int64_t size = (int64_t)1 << (v - (v >= S_ALLOC ? S_ALLOC : S_PCP));
            if (v >= S_ALLOC && c->mt[head] == MIGRATE_MOVABLE) {
                int64_t stop = head + size < end + 1 ? head + size : end + 1;
                movable += stop - p;
            }
            p = head + size;
        }
    }
    *movable_out = movable;
    return moved;
}

/* _steal_suitable_fallback */
static void steal_suitable_fallback(Core *c, int zi, int64_t pfn, int current_order,
                                    int start_type, int whole_block) {
    uint8_t *pbm = c->pbm;
    int old_block_type = pbm[pfn >> PAGEBLOCK_ORDER];
    if (current_order >= PAGEBLOCK_ORDER) {
        int64_t first = pfn >> PAGEBLOCK_ORDER;
        int64_t n = (int64_t)1 << (current_order - PAGEBLOCK_ORDER);
        for (int64_t b = first; b < first + n; b++) pbm[b] = (uint8_t)start_type;
    } else if (whole_block) {
        int64_t movable_pages;
        int64_t free_pages = move_freepages_block(c, zi, pfn, start_type, &movable_pages);
        int64_t alike_pages;
        if (start_type == MIGRATE_MOVABLE)
            alike_pages = movable_pages;
        else if (old_block_type == MIGRATE_MOVABLE)
            alike_pages = PAGEBLOCK_NR_PAGES - (free_pages + movable_pages);
        else
            alike_pages = 0;
        if (free_pages) {
            if (free_pages + alike_pages >= PAGEBLOCK_NR_PAGES >> 1)
                pbm[pfn >> PAGEBLOCK_ORDER] = (uint8_t)start_type;
            return;
        }
    }
    list_del(c, pfn);
    list_add_tail(c, pfn, buddy_list(c, zi, start_type, current_order));
}

/* _rmqueue_fallback: __rmqueue_fallback() */
static int rmqueue_fallback(Core *c, int zi, int order, int start_mt, int nofragment) {
    int min_order = nofragment ? PAGEBLOCK_ORDER : order;
    for (int current = MAX_ORDER; current >= min_order; current--) {
        int can_steal;
        int fmt = find_suitable_fallback(c, zi, current, start_mt, &can_steal);
        if (fmt < 0) continue;
        if (!can_steal && start_mt == MIGRATE_MOVABLE && current > order) {
            for (current = order; current < NR_ORDERS; current++) { /* find_smallest */
                fmt = find_suitable_fallback(c, zi, current, start_mt, &can_steal);
                if (fmt >= 0) break;
            }
            if (current == NR_ORDERS) current = MAX_ORDER; /* unreachable: one was found */
        }
        int64_t pfn = c->next[buddy_list(c, zi, fmt, current)];
        steal_suitable_fallback(c, zi, pfn, current, start_mt, can_steal);
        return 1;
    }
    return 0;
}

/* _rmqueue: __rmqueue() */
static int64_t rmqueue(Core *c, int zi, int order, int mt, int nofragment) {
    for (;;) {
        int64_t pfn = rmqueue_smallest(c, zi, order, mt);
        if (pfn >= 0) return pfn;
        if (!rmqueue_fallback(c, zi, order, mt, nofragment)) return -1;
    }
}

/* _free_one_page: __free_one_page() */
static void free_one_page(Core *c, int64_t pfn, int zi, int order, int mt, int to_tail) {
    uint8_t *state = c->state;
    int64_t zs = c->zone_start[zi], ze = c->zone_end[zi];
    int64_t *nr_free = c->nr_free + zi * NR_ORDERS;
    c->free_pages[zi] += (int64_t)1 << order;
    while (order < MAX_ORDER) {
        int64_t buddy = pfn ^ ((int64_t)1 << order);
        if (buddy < zs || buddy >= ze || state[buddy] != S_FREE + order) break;
        list_del(c, buddy);
        nr_free[order]--;
        state[buddy] = 0;
        pfn &= ~((int64_t)1 << order);
        order++;
    }
    state[pfn] = (uint8_t)(S_FREE + order);
    nr_free[order]++;
    int64_t head = buddy_list(c, zi, mt, order);
    if (!to_tail && order < MERGE_LIKELY_MAX) {
        int64_t higher = (pfn & ~((int64_t)1 << order)) ^ ((int64_t)1 << (order + 1));
        to_tail = zs <= higher && higher < ze && state[higher] == S_FREE + order + 1;
    }
    if (to_tail)
        list_add_tail(c, pfn, head);
    else
        list_add(c, pfn, head);
}

/* _free_pcppages_bulk: free_pcppages_bulk() */
static void free_pcppages_bulk(Core *c, int zi, int64_t count, int64_t *pcp, int pindex) {
    if (pcp[P_COUNT] < count) count = pcp[P_COUNT];
    int min_pindex = 0, max_pindex = NR_PCP_LISTS - 1;
    pindex -= 1;
    int32_t *nxt = c->next, *prv = c->prev;
    int64_t first = pcp[P_FIRST];
    while (count > 0) {
        int64_t head;
        for (;;) {
            pindex++;
            if (pindex > max_pindex) pindex = min_pindex;
            head = first + pindex;
            if (nxt[head] != head) break;
            if (pindex == max_pindex) max_pindex--;
            if (pindex == min_pindex) min_pindex++;
        }
        int order = pindex == NR_LOWORDER_PCP_LISTS ? PAGEBLOCK_ORDER : pindex / 3;
        int64_t nr_pages = (int64_t)1 << order;
        for (;;) {
            int64_t page = prv[head];
            int32_t p = prv[page];
            nxt[p] = (int32_t)head;
            prv[head] = p;
            count -= nr_pages;
            pcp[P_COUNT] -= nr_pages;
            c->state[page] = 0;
            free_one_page(c, page, zi, order, c->mt[page], 0);
            if (count <= 0 || nxt[head] == head) break;
        }
    }
}

/* pool.guest.pcp.nr_pcp_free */
static int64_t nr_pcp_free(int64_t *pcp, int64_t high, int64_t batch, int free_high) {
    if (free_high) return pcp[P_COUNT];
    if (high < batch) return 1;
    int64_t min_nr_free = batch, max_nr_free = high - batch;
    batch <<= pcp[P_FF];
    if (batch < max_nr_free) pcp[P_FF]++;
    int64_t v = batch < max_nr_free ? batch : max_nr_free;
    return v > min_nr_free ? v : min_nr_free;
}

static inline int pindex_of(int order, int mt) {
    return order > COSTLY_ORDER ? NR_LOWORDER_PCP_LISTS : MIGRATE_PCPTYPES * order + mt;
}

/* _free_unref_page_commit: free_unref_page_commit() */
static void free_unref_page_commit(Core *c, int zi, int64_t *pcp, int64_t pfn, int mt,
                                   int order) {
    int pindex = pindex_of(order, mt);
    list_add(c, pfn, pcp[P_FIRST] + pindex);
    pcp[P_COUNT] += (int64_t)1 << order;
    int free_high = pcp[P_FF] != 0 && order > 0 && order <= COSTLY_ORDER;
    int64_t high = (free_high || !pcp[P_HIGH]) ? 0 : pcp[P_HIGH];
    if (pcp[P_COUNT] >= high)
        free_pcppages_bulk(c, zi, nr_pcp_free(pcp, high, pcp[P_BATCH], free_high), pcp, pindex);
}

/* _rmqueue_bulk: rmqueue_bulk() */
static int64_t rmqueue_bulk(Core *c, int zi, int order, int64_t count, int64_t head, int mt,
                            int nofragment) {
    int64_t allocated = 0;
    for (int64_t i = 0; i < count; i++) {
        int64_t pfn = rmqueue(c, zi, order, mt, nofragment);
        if (pfn < 0) break;
        list_add_tail(c, pfn, head);
        c->state[pfn] = (uint8_t)(S_PCP + order);
        allocated++;
    }
    c->free_pages[zi] -= allocated << order;
    return allocated;
}

/* _rmqueue_pcp_list: __rmqueue_pcplist() */
static int64_t rmqueue_pcp_list(Core *c, int zi, int order, int mt, int nofragment,
                                int64_t *pcp, int pindex) {
    int64_t head = pcp[P_FIRST] + pindex;
    int32_t *nxt = c->next;
    if (nxt[head] == head) {
        int64_t batch = pcp[P_BATCH];
        if (batch > 1) {
            batch >>= order;
            if (batch < 2) batch = 2;
        }
        pcp[P_COUNT] += rmqueue_bulk(c, zi, order, batch, head, mt, nofragment) << order;
        if (nxt[head] == head) return -1;
    }
    int64_t pfn = nxt[head];
    int32_t n = nxt[pfn];
    nxt[head] = n;
    c->prev[n] = (int32_t)head;
    pcp[P_COUNT] -= (int64_t)1 << order;
    c->state[pfn] = 0;
    return pfn;
}

/* _rmqueue_pcplist: rmqueue_pcplist() */
static int64_t rmqueue_pcplist(Core *c, int zi, int order, int mt, int nofragment, int cpu) {
    int64_t *pcp = pcp_of(c, zi, cpu);
    pcp[P_FF] >>= 1;
    return rmqueue_pcp_list(c, zi, order, mt, nofragment, pcp, pindex_of(order, mt));
}

static int64_t pcp_pages(Core *c) {
    int64_t total = 0;
    for (int64_t i = 0; i < (int64_t)c->nzones * c->cpus; i++) total += c->pcp[i * P_FIELDS + P_COUNT];
    return total;
}

/* drain_all_pages */
static void drain_all_pages(Core *c) {
    for (int zi = 0; zi < c->nzones; zi++)
        for (int cpu = 0; cpu < c->cpus; cpu++) {
            int64_t *pcp = pcp_of(c, zi, cpu);
            if (pcp[P_COUNT]) free_pcppages_bulk(c, zi, pcp[P_COUNT], pcp, 0);
        }
}

/* PageAllocator.alloc (arguments already checked): get_page_from_freelist() + drain/retry */
static int64_t core_alloc(Core *c, int order, const int *zis, int nzis, int nofragment, int mt,
                          int cpu) {
    int use_pcp = c->cpus > 0 && (order <= COSTLY_ORDER || order == PAGEBLOCK_ORDER);
    int drained = 0;
    for (;;) {
        for (int i = 0; i < nzis; i++) {
            int zi = zis[i];
            int64_t pfn = -1;
            if (use_pcp) pfn = rmqueue_pcplist(c, zi, order, mt, nofragment, cpu);
            if (pfn < 0) {
                pfn = rmqueue(c, zi, order, mt, nofragment);
                if (pfn < 0) continue;
                c->free_pages[zi] -= (int64_t)1 << order;
            }
            c->state[pfn] = (uint8_t)(S_ALLOC + order);
            c->mt[pfn] = (uint8_t)mt;
            c->counters[0] += (int64_t)1 << order;
            return pfn;
        }
        if (nofragment)
            nofragment = 0;
        else if (!drained && pcp_pages(c)) {
            drain_all_pages(c);
            drained = 1;
        } else
            break;
    }
    return -1;
}

/* PageAllocator.free (arguments already checked: state[pfn] == S_ALLOC + order) */
static void core_free(Core *c, int64_t pfn, int order, int cpu) {
    int zi = zone_of(c, pfn);
    c->counters[0] -= (int64_t)1 << order;
    int mt = c->pbm[pfn >> PAGEBLOCK_ORDER];
    if (c->cpus && (order <= COSTLY_ORDER || order == PAGEBLOCK_ORDER)) {
        c->state[pfn] = (uint8_t)(S_PCP + order);
        c->mt[pfn] = (uint8_t)mt;
        free_unref_page_commit(c, zi, pcp_of(c, zi, cpu), pfn, mt, order);
        return;
    }
    c->state[pfn] = 0;
    free_one_page(c, pfn, zi, order, mt, 0);
}

/* ------------------------------------------------------------------ Python glue */

static int parse_zis(Core *c, PyObject *seq, int *zis, int *nzis) {
    PyObject *fast = PySequence_Fast(seq, "zone indexes must be a sequence");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_ZONES) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many zones");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v < 0 || v >= c->nzones) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "zone index out of range");
            return -1;
        }
        zis[i] = (int)v;
    }
    *nzis = (int)n;
    Py_DECREF(fast);
    return 0;
}

static int check_cpu(Core *c, int cpu) {
    if (c->cpus && (cpu < 0 || cpu >= c->cpus)) {
        PyErr_Format(PyExc_ValueError, "no cpu %d: this allocator has %d with pcp lists", cpu,
                     c->cpus);
        return -1;
    }
    return 0;
}

static PyObject *Core_alloc(Core *c, PyObject *args) {
    int order, nofragment, mt, cpu, zis[MAX_ZONES], nzis;
    PyObject *zseq;
    if (!PyArg_ParseTuple(args, "iOpii", &order, &zseq, &nofragment, &mt, &cpu)) return NULL;
    if (order < 0 || order > MAX_ORDER || mt < 0 || mt >= MIGRATE_PCPTYPES) {
        PyErr_SetString(PyExc_ValueError, "order or migratetype out of range");
        return NULL;
    }
    if (check_cpu(c, cpu) < 0 || parse_zis(c, zseq, zis, &nzis) < 0) return NULL;
    return PyLong_FromLongLong(core_alloc(c, order, zis, nzis, nofragment, mt, cpu));
}

/* __alloc_pages_bulk() into `out` (room for nr_pages): the pages taken, in order. Never
 * fails in the Python sense: no page is not an error. See PageAllocator.alloc_bulk. */
static Py_ssize_t bulk_take(Core *c, Py_ssize_t nr_pages, const int *zis, int nzis,
                            int nofragment, int mt, int cpu, int64_t *out) {
    int chosen = -1;
    if (nr_pages > 1 && c->cpus) {
        for (int i = 0; i < nzis; i++) {
            int zi = zis[i];
            if (c->free_pages[zi] > c->low_wmark[zi] + nr_pages) {
                chosen = zi;
                break;
            }
        }
    }
    Py_ssize_t got = 0;
    if (chosen >= 0) {
        int64_t *pcp = pcp_of(c, chosen, cpu);
        int pindex = mt;
        while (got < nr_pages) {
            int64_t pfn = rmqueue_pcp_list(c, chosen, 0, mt, 0, pcp, pindex);
            if (pfn < 0) break;
            c->state[pfn] = S_ALLOC;
            c->mt[pfn] = (uint8_t)mt;
            out[got++] = pfn;
        }
        c->counters[0] += got;
    }
    if (got == 0) {
        int64_t pfn = core_alloc(c, 0, zis, nzis, nofragment, mt, cpu);
        if (pfn >= 0) out[got++] = pfn;
    }
    return got;
}

static int parse_bulk_args(Core *c, PyObject *zseq, int mt, int cpu, int *zis, int *nzis) {
    if (mt < 0 || mt >= MIGRATE_PCPTYPES) {
        PyErr_SetString(PyExc_ValueError, "migratetype out of range");
        return -1;
    }
    if (parse_zis(c, zseq, zis, nzis) < 0 || check_cpu(c, cpu) < 0) return -1;
    return 0;
}

/* PageAllocator.alloc_bulk: __alloc_pages_bulk() */
static PyObject *Core_alloc_bulk(Core *c, PyObject *args) {
    Py_ssize_t nr_pages;
    int nofragment, mt, cpu, zis[MAX_ZONES], nzis;
    PyObject *zseq;
    if (!PyArg_ParseTuple(args, "nOpii", &nr_pages, &zseq, &nofragment, &mt, &cpu)) return NULL;
    if (parse_bulk_args(c, zseq, mt, cpu, zis, &nzis) < 0) return NULL;
    if (nr_pages <= 0) return PyList_New(0);
    int64_t *pages = PyMem_Malloc((size_t)nr_pages * sizeof(int64_t));
    if (!pages) return PyErr_NoMemory();
    Py_ssize_t got = bulk_take(c, nr_pages, zis, nzis, nofragment, mt, cpu, pages);
    PyObject *out = PyList_New(got);
    for (Py_ssize_t i = 0; out && i < got; i++) {
        PyObject *v = PyLong_FromLongLong(pages[i]);
        if (!v) {
            Py_CLEAR(out); /* the pages stay taken, as the Python loop leaves them */
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    PyMem_Free(pages);
    return out;
}

/* vm_area_alloc_pages(nr_pages, request_max, zone_indexes, nofragment, migratetype, cpu)
 * -> bytearray of int64 pfns: pool.guest.vmalloc.vm_area_alloc_pages's loop (bulk requests
 * of at most request_max pages until one comes back short, then single pages until one
 * fails), in one call instead of one per 100 pages. */
static PyObject *Core_vm_area_alloc_pages(Core *c, PyObject *args) {
    Py_ssize_t nr_pages, request_max;
    int nofragment, mt, cpu, zis[MAX_ZONES], nzis;
    PyObject *zseq;
    if (!PyArg_ParseTuple(args, "nnOpii", &nr_pages, &request_max, &zseq, &nofragment, &mt,
                          &cpu))
        return NULL;
    if (request_max < 1) {
        PyErr_SetString(PyExc_ValueError, "request_max must be >= 1");
        return NULL;
    }
    if (nr_pages < 0) nr_pages = 0;
    if (parse_bulk_args(c, zseq, mt, cpu, zis, &nzis) < 0) return NULL;
    PyObject *out = PyByteArray_FromStringAndSize(NULL, nr_pages * (Py_ssize_t)sizeof(int64_t));
    if (!out) return NULL;
    int64_t *pages = (int64_t *)PyByteArray_AS_STRING(out);
    Py_ssize_t got = 0;
    while (got < nr_pages) {
        Py_ssize_t request = nr_pages - got < request_max ? nr_pages - got : request_max;
        Py_ssize_t n = bulk_take(c, request, zis, nzis, nofragment, mt, cpu, pages + got);
        got += n;
        if (n != request) break;
    }
    while (got < nr_pages) {
        int64_t pfn = core_alloc(c, 0, zis, nzis, nofragment, mt, cpu);
        if (pfn < 0) break;
        pages[got++] = pfn;
    }
    if (PyByteArray_Resize(out, got * (Py_ssize_t)sizeof(int64_t)) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* free(pfn, order, cpu) -> True, or False (nothing changed) when pfn does not start a block
 * allocated at that order: the caller explains. */
static PyObject *Core_free(Core *c, PyObject *args) {
    long long pfn;
    int order, cpu;
    if (!PyArg_ParseTuple(args, "Lii", &pfn, &order, &cpu)) return NULL;
    if (order < 0 || order > MAX_ORDER || pfn < 0 || pfn >= c->end_pfn ||
        c->state[pfn] != S_ALLOC + order)
        Py_RETURN_FALSE;
    if (c->cpus && (order <= COSTLY_ORDER || order == PAGEBLOCK_ORDER) && check_cpu(c, cpu) < 0)
        return NULL;
    core_free(c, pfn, order, cpu);
    Py_RETURN_TRUE;
}

/* free_bulk(pfns: int64 buffer, cpu) -> the number freed: order-0 frees in order, stopping at
 * the first pfn that is not an allocated order-0 block (the caller explains it). */
static PyObject *Core_free_bulk(Core *c, PyObject *args) {
    Py_buffer view;
    int cpu;
    if (!PyArg_ParseTuple(args, "y*i", &view, &cpu)) return NULL;
    if (view.len % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pfns must be an int64 buffer");
        return NULL;
    }
    if (c->cpus && check_cpu(c, cpu) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const int64_t *pfns = (const int64_t *)view.buf;
    Py_ssize_t n = view.len / 8, i;
    for (i = 0; i < n; i++) {
        int64_t pfn = pfns[i];
        if (pfn < 0 || pfn >= c->end_pfn || c->state[pfn] != S_ALLOC) break;
        core_free(c, pfn, 0, cpu);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(i);
}

static PyObject *Core_drain_all_pages(Core *c, PyObject *Py_UNUSED(ignored)) {
    drain_all_pages(c);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ the churn's step loop */

/* Python's random.Random (MT19937, random() = genrand_res53()), state taken from and given
 * back to a random.Random with getstate()/setstate(): the same stream as the reference. */
typedef struct {
    uint32_t mt[624];
    int index;
} MT;

static uint32_t mt_next(MT *m) {
    static const uint32_t mag01[2] = {0x0u, 0x9908b0dfu};
    uint32_t y;
    if (m->index >= 624) {
        int kk;
        for (kk = 0; kk < 624 - 397; kk++) {
            y = (m->mt[kk] & 0x80000000u) | (m->mt[kk + 1] & 0x7fffffffu);
            m->mt[kk] = m->mt[kk + 397] ^ (y >> 1) ^ mag01[y & 0x1u];
        }
        for (; kk < 623; kk++) {
            y = (m->mt[kk] & 0x80000000u) | (m->mt[kk + 1] & 0x7fffffffu);
            m->mt[kk] = m->mt[kk + (397 - 624)] ^ (y >> 1) ^ mag01[y & 0x1u];
        }
        y = (m->mt[623] & 0x80000000u) | (m->mt[0] & 0x7fffffffu);
        m->mt[623] = m->mt[396] ^ (y >> 1) ^ mag01[y & 0x1u];
        m->index = 0;
    }
    y = m->mt[m->index++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    return y;
}

static double mt_random(MT *m) {
    uint32_t a = mt_next(m) >> 5, b = mt_next(m) >> 6;
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
}

/* The churn's live allocations, in place in its array('q'): a buffer view while the loop
 * runs, the array grown (frombytes) when a push finds no room, and cut back to the entries
 * in use at the end. No copy of the entries per call. */
typedef struct {
    PyObject *arr;
    Py_buffer view;
    int held;
    int64_t *v;
    Py_ssize_t n, cap;
} Vec;

static int vec_acquire(Vec *s) {
    if (PyObject_GetBuffer(s->arr, &s->view, PyBUF_WRITABLE) < 0) return -1;
    if (s->view.itemsize != 8) {
        PyBuffer_Release(&s->view);
        PyErr_SetString(PyExc_ValueError, "live allocations must be an array('q')");
        return -1;
    }
    s->held = 1;
    s->v = s->view.buf;
    s->cap = s->view.len / 8;
    return 0;
}

static void vec_release(Vec *s) {
    if (s->held) PyBuffer_Release(&s->view);
    s->held = 0;
    s->v = NULL;
}

static int vec_reserve(Vec *s, Py_ssize_t extra) {
    vec_release(s);
    PyObject *zeros = PyBytes_FromStringAndSize(NULL, extra * 8);
    if (!zeros) return -1;
    memset(PyBytes_AS_STRING(zeros), 0, extra * 8);
    PyObject *r = PyObject_CallMethod(s->arr, "frombytes", "O", zeros);
    Py_DECREF(zeros);
    if (!r) return -1;
    Py_DECREF(r);
    return vec_acquire(s);
}

static int vec_open(Vec *s, PyObject *arr, Py_ssize_t headroom) {
    s->arr = arr;
    s->held = 0;
    if (vec_acquire(s) < 0) return -1;
    s->n = s->cap;
    return vec_reserve(s, headroom);
}

/* Release the view and cut the array to the entries in use. */
static int vec_close(Vec *s) {
    if (!s->arr) return 0;
    vec_release(s);
    Py_ssize_t len = PyObject_Length(s->arr);
    if (len < 0) return -1;
    if (len > s->n && PySequence_DelSlice(s->arr, s->n, len) < 0) return -1;
    return 0;
}

static int vec_push(Vec *s, int64_t x) {
    if (s->n == s->cap && vec_reserve(s, s->cap > 1024 ? s->cap : 1024) < 0) return -1;
    s->v[s->n++] = x;
    return 0;
}

typedef struct {
    Core *c;
    MT rng;
    Vec live[2]; /* 0: short-lived, 1: long-lived; entry = pfn << 4 | order */
    int64_t pages[2];
    int64_t target, peak, long_cap;
    double short_cum[NR_ORDERS], long_cum[NR_ORDERS], pagecache_cum[NR_ORDERS];
    double long_unmovable, long_reclaimable, short_unmovable, long_fraction;
    int64_t free_batch, kernel_blocks;
    int zis[MAX_ZONES], nzis, nofragment;
    int cpu;
    int64_t allocations_made, frees_made;
} ChurnRun;

static int bisect_right(const double *cum, double x) {
    int lo = 0, hi = NR_ORDERS;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (x < cum[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void churn_free(ChurnRun *r, int64_t entry) {
    int order = (int)(entry & 15);
    core_free(r->c, entry >> 4, order, r->cpu);
}

/* Churn._free_one: 1 freed, 0 nothing to free */
static int churn_free_one(ChurnRun *r, int short_only) {
    int which;
    if (!short_only && r->live[1].n && (r->pages[1] > r->long_cap || !r->live[0].n))
        which = 1;
    else if (r->live[0].n)
        which = 0;
    else
        return 0;
    Vec *e = &r->live[which];
    Py_ssize_t n = e->n;
    int64_t pages = 0;
    if (r->free_batch == 1) {
        Py_ssize_t i = (Py_ssize_t)(mt_random(&r->rng) * n);
        int64_t entry = e->v[i];
        int64_t last = e->v[--e->n];
        if (i < n - 1) e->v[i] = last;
        churn_free(r, entry);
        r->frees_made++;
        pages = (int64_t)1 << (entry & 15);
    } else {
        Py_ssize_t i = (Py_ssize_t)(mt_random(&r->rng) * n);
        Py_ssize_t end = i + r->free_batch < n ? i + r->free_batch : n;
        Py_ssize_t width = end - i;
        for (Py_ssize_t k = i; k < end; k++) {
            churn_free(r, e->v[k]);
            pages += (int64_t)1 << (e->v[k] & 15);
        }
        /* moved = entries[max(end, n - width):n]; entries[i:i+len(moved)] = moved */
        Py_ssize_t from = end > n - width ? end : n - width;
        Py_ssize_t len = n - from;
        memmove(e->v + i, e->v + from, len * sizeof(int64_t));
        e->n = n - width;
        r->frees_made += width;
    }
    r->pages[which] -= pages;
    return 1;
}

/* Churn._allocate: 1 done, 0 gave up, -1 error (Python exception set) */
static int churn_allocate(ChurnRun *r, const double *short_cum, double long_fraction,
                          int reclaim) {
    int is_long, mt;
    const double *cum;
    if (long_fraction != 0.0 && mt_random(&r->rng) < long_fraction) {
        is_long = 1;
        cum = r->long_cum;
        double x = mt_random(&r->rng);
        if (x < r->long_unmovable)
            mt = MIGRATE_UNMOVABLE;
        else if (x < r->long_unmovable + r->long_reclaimable)
            mt = MIGRATE_RECLAIMABLE;
        else
            mt = MIGRATE_MOVABLE;
    } else {
        is_long = 0;
        cum = short_cum;
        mt = MIGRATE_MOVABLE;
    }
    int order = bisect_right(cum, mt_random(&r->rng) * cum[NR_ORDERS - 1]);
    if (order >= NR_ORDERS) order = NR_ORDERS - 1;
    if (!is_long && order < 2 && reclaim && mt_random(&r->rng) < r->short_unmovable)
        mt = MIGRATE_UNMOVABLE;
    int64_t pfn = core_alloc(r->c, order, r->zis, r->nzis, r->nofragment, mt, r->cpu);
    while (pfn < 0) {
        if (order)
            order--;
        else if (!reclaim || !churn_free_one(r, 0)) {
            if (reclaim) {
                PyErr_SetString(PyExc_RuntimeError,
                                "churn: no free page in its zonelist and no allocation of its "
                                "own to free");
                return -1;
            }
            return 0;
        }
        pfn = core_alloc(r->c, order, r->zis, r->nzis, r->nofragment, mt, r->cpu);
    }
    r->allocations_made++;
    if (vec_push(&r->live[is_long], pfn << 4 | order) < 0) return -1;
    r->pages[is_long] += (int64_t)1 << order;
    return 1;
}

/* Churn._kernel_burst: kernel_blocks unmovable blocks of order getrandbits(2), then in
 * allocation order each freed on getrandbits(1), kept (long-lived) otherwise. 0 or -1. */
static int churn_kernel_burst(ChurnRun *r) {
    int64_t count = r->kernel_blocks;
    if (!count) return 0;
    int64_t *blocks = PyMem_Malloc((size_t)count * sizeof(int64_t));
    if (!blocks) {
        PyErr_NoMemory();
        return -1;
    }
    int64_t n = 0;
    for (int64_t i = 0; i < count; i++) {
        int order = (int)(mt_next(&r->rng) >> 30); /* getrandbits(2) */
        int64_t pfn =
            core_alloc(r->c, order, r->zis, r->nzis, r->nofragment, MIGRATE_UNMOVABLE, r->cpu);
        if (pfn < 0) break;
        blocks[n++] = pfn << 4 | order;
    }
    r->allocations_made += n;
    int rc = 0;
    for (int64_t i = 0; i < n; i++) {
        if (mt_next(&r->rng) >> 31) { /* getrandbits(1) */
            churn_free(r, blocks[i]);
            r->frees_made++;
        } else if (rc == 0) {
            if (vec_push(&r->live[1], blocks[i]) < 0)
                rc = -1; /* the rest stays allocated, as after a MemoryError in Python */
            else
                r->pages[1] += (int64_t)1 << (blocks[i] & 15);
        }
    }
    PyMem_Free(blocks);
    return rc;
}

static int read_cum(PyObject *seq, double *out) {
    PyObject *fast = PySequence_Fast(seq, "cumulative weights must be a sequence");
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != NR_ORDERS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "cumulative weights: 11 values expected");
        return -1;
    }
    for (int i = 0; i < NR_ORDERS; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* churn_step(params: dict, state: tuple) -> new state tuple. See Churn.step. */
static PyObject *Core_churn_step(Core *c, PyObject *args) {
    long long n, steps_done, interval;
    PyObject *rng_state, *short_arr, *long_arr, *zseq, *short_cum, *long_cum, *pc_cum;
    ChurnRun r;
    memset(&r, 0, sizeof r);
    r.c = c;
    long long short_pages, long_pages, target, peak, long_cap, free_batch, kernel_blocks;
    int nofragment;
    if (!PyArg_ParseTuple(args, "LLLOOOLLLLLLOOOddddOpL", &n, &steps_done, &interval,
                          &rng_state, &short_arr, &long_arr, &short_pages,
                          &long_pages, &target, &peak, &long_cap, &free_batch, &short_cum,
                          &long_cum, &pc_cum, &r.long_fraction, &r.long_unmovable,
                          &r.long_reclaimable, &r.short_unmovable, &zseq, &nofragment,
                          &kernel_blocks))
        return NULL;
    if (kernel_blocks < 0) {
        PyErr_SetString(PyExc_ValueError, "kernel_blocks must be >= 0");
        return NULL;
    }
    r.kernel_blocks = kernel_blocks;
    if (free_batch < 1) {
        PyErr_SetString(PyExc_ValueError, "free_batch must be >= 1");
        return NULL;
    }
    r.pages[0] = short_pages;
    r.pages[1] = long_pages;
    r.target = target;
    r.peak = peak;
    r.long_cap = long_cap;
    r.free_batch = free_batch;
    r.nofragment = nofragment;
    if (read_cum(short_cum, r.short_cum) < 0 || read_cum(long_cum, r.long_cum) < 0 ||
        read_cum(pc_cum, r.pagecache_cum) < 0 || parse_zis(c, zseq, r.zis, &r.nzis) < 0)
        return NULL;
    /* random.Random.getstate() internal part: 624 words + index */
    PyObject *fast = PySequence_Fast(rng_state, "rng state must be a sequence");
    if (!fast) return NULL;
    if (PySequence_Fast_GET_SIZE(fast) != 625) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "rng state: 625 values expected");
        return NULL;
    }
    for (int i = 0; i < 625; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        if (i < 624)
            r.rng.mt[i] = (uint32_t)v;
        else
            r.rng.index = (int)v;
    }
    Py_DECREF(fast);
    if (!PyObject_TypeCheck(short_arr, Py_TYPE(long_arr))) {
        PyErr_SetString(PyExc_TypeError, "live allocations: two array('q')");
        return NULL;
    }
    /* room for every step's allocation; pressure episodes grow the arrays as they go */
    Py_ssize_t headroom = (Py_ssize_t)(n < 1 << 20 ? n : 1 << 20) + 64;
    if (vec_open(&r.live[0], short_arr, headroom) < 0) return NULL;
    if (vec_open(&r.live[1], long_arr, headroom) < 0) {
        vec_close(&r.live[0]);
        return NULL;
    }
    int cpus = c->cpus > 1 ? c->cpus : 1;
    int failed = 0;
    for (long long s = 0; s < n && !failed; s++) {
        r.cpu = (int)(steps_done % cpus);
        if (interval && steps_done % interval == 0) { /* Churn._pressure_episode */
            if (churn_kernel_burst(&r) < 0) {
                failed = 1;
                break;
            }
            while (r.pages[0] + r.pages[1] < r.peak) {
                int got = churn_allocate(&r, r.pagecache_cum, 0.0, 0);
                if (got < 0) {
                    failed = 1;
                    break;
                }
                if (!got) break;
            }
            if (failed) break;
            while (r.pages[0] + r.pages[1] > r.target)
                if (!churn_free_one(&r, 1)) break;
        }
        if (churn_allocate(&r, r.short_cum, r.long_fraction, 1) < 0) {
            failed = 1;
            break;
        }
        while (r.pages[0] + r.pages[1] > r.target) churn_free_one(&r, 0);
        steps_done++;
        /* the reference's step loop checks no signal; a long aging is chunked by Churn.run */
    }
    /* a RuntimeError of the loop is handed back beside the state (the caller stores the
     * state, then raises), so it is fetched before anything else calls into Python */
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    if (failed) {
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        PyErr_NormalizeException(&exc_type, &exc_value, &exc_tb);
    }
    PyObject *result = NULL;
    int closed = vec_close(&r.live[0]);
    closed |= vec_close(&r.live[1]);
    PyObject *words = closed < 0 ? NULL : PyTuple_New(625);
    if (words) {
        int ok = 1;
        for (int i = 0; i < 625 && ok; i++) {
            PyObject *v = PyLong_FromUnsignedLong(i < 624 ? r.rng.mt[i] : (unsigned long)r.rng.index);
            if (!v)
                ok = 0;
            else
                PyTuple_SET_ITEM(words, i, v);
        }
        if (ok)
            result = Py_BuildValue("(OOOLLLLLLi)", words, short_arr, long_arr, steps_done,
                                   (long long)r.pages[0], (long long)r.pages[1],
                                   (long long)r.allocations_made, (long long)r.frees_made,
                                   (long long)r.cpu, failed);
    }
    Py_XDECREF(words);
    if (!result) {
        Py_XDECREF(exc_type);
        Py_XDECREF(exc_value);
        Py_XDECREF(exc_tb);
        return NULL;
    }
    PyObject *pair = Py_BuildValue("(OO)", result, exc_value ? exc_value : Py_None);
    Py_DECREF(result);
    Py_XDECREF(exc_type);
    Py_XDECREF(exc_value);
    Py_XDECREF(exc_tb);
    return pair;
}

/* ------------------------------------------------------------------ type */

static void Core_dealloc(Core *c) {
    for (int i = 0; i < c->nviews; i++) PyBuffer_Release(&c->views[i]);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int get_view(Core *c, PyObject *obj, Py_ssize_t itemsize, Py_ssize_t min_items,
                    const char *what, void **out) {
    Py_buffer *v = &c->views[c->nviews];
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE) < 0) return -1;
    c->nviews++;
    if (v->len < min_items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: buffer too small", what);
        return -1;
    }
    if (v->itemsize != itemsize && v->itemsize != 1) {
        PyErr_Format(PyExc_ValueError, "%s: items of %zd bytes expected", what, itemsize);
        return -1;
    }
    *out = v->buf;
    return 0;
}

/* Core(state, mt, pageblock_mt, next, prev, nr_free, free_pages, counters, pcp, end_pfn,
 *      zone_bounds, cpus): zone_bounds one (start_pfn, end_pfn, low watermark) per zone;
 *      pcp holds zones x cpus records of 5 int64 (PerCpuPages). */
static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *st, *mt, *pbm, *nx, *pv, *nf, *fp, *ct, *pc, *bounds;
    long long end_pfn;
    int cpus;
    static char *kwlist[] = {"state", "mt", "pageblock_mt", "next", "prev", "nr_free",
                             "free_pages", "counters", "pcp", "end_pfn", "zone_bounds",
                             "cpus", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOLOi", kwlist, &st, &mt, &pbm, &nx,
                                     &pv, &nf, &fp, &ct, &pc, &end_pfn, &bounds, &cpus))
        return NULL;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    c->end_pfn = end_pfn;
    c->cpus = cpus;
    PyObject *fast = PySequence_Fast(bounds, "zone_bounds must be a sequence");
    if (!fast) goto fail;
    Py_ssize_t nz = PySequence_Fast_GET_SIZE(fast);
    if (nz < 1 || nz > MAX_ZONES) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "1 to 8 zones");
        goto fail;
    }
    c->nzones = (int)nz;
    for (Py_ssize_t i = 0; i < nz; i++) {
        long long s, e, low;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "LLL", &s, &e, &low)) {
            Py_DECREF(fast);
            goto fail;
        }
        c->zone_start[i] = s;
        c->zone_end[i] = e;
        c->low_wmark[i] = low;
    }
    Py_DECREF(fast);
    int64_t nlists = (int64_t)nz * MIGRATE_PCPTYPES * NR_ORDERS + (int64_t)nz * cpus * NR_PCP_LISTS;
    if (cpus < 0 || end_pfn < 1 || end_pfn + nlists > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "end_pfn or cpus out of range for int32 links");
        goto fail;
    }
    void *p;
    if (get_view(c, st, 1, end_pfn, "state", &p) < 0) goto fail;
    c->state = p;
    if (get_view(c, mt, 1, end_pfn, "mt", &p) < 0) goto fail;
    c->mt = p;
    if (get_view(c, pbm, 1, (end_pfn + PAGEBLOCK_NR_PAGES - 1) >> PAGEBLOCK_ORDER, "pageblock_mt",
                 &p) < 0)
        goto fail;
    c->pbm = p;
    if (get_view(c, nx, 4, end_pfn + nlists, "next", &p) < 0) goto fail;
    c->next = p;
    if (get_view(c, pv, 4, end_pfn + nlists, "prev", &p) < 0) goto fail;
    c->prev = p;
    if (get_view(c, nf, 8, nz * NR_ORDERS, "nr_free", &p) < 0) goto fail;
    c->nr_free = p;
    if (get_view(c, fp, 8, nz, "free_pages", &p) < 0) goto fail;
    c->free_pages = p;
    if (get_view(c, ct, 8, 1, "counters", &p) < 0) goto fail;
    c->counters = p;
    if (get_view(c, pc, 8, nz * cpus * P_FIELDS, "pcp", &p) < 0) goto fail;
    c->pcp = p;
    return (PyObject *)c;
fail:
    Py_DECREF(c);
    return NULL;
}

static PyMethodDef Core_methods[] = {
    {"alloc", (PyCFunction)Core_alloc, METH_VARARGS,
     "alloc(order, zone_indexes, nofragment, migratetype, cpu) -> pfn or -1"},
    {"alloc_bulk", (PyCFunction)Core_alloc_bulk, METH_VARARGS,
     "alloc_bulk(nr_pages, zone_indexes, nofragment, migratetype, cpu) -> list of pfns"},
    {"vm_area_alloc_pages", (PyCFunction)Core_vm_area_alloc_pages, METH_VARARGS,
     "vm_area_alloc_pages(nr_pages, request_max, zone_indexes, nofragment, migratetype, cpu)"
     " -> bytearray of int64 pfns"},
    {"free", (PyCFunction)Core_free, METH_VARARGS,
     "free(pfn, order, cpu) -> False (nothing done) if pfn is not allocated at that order"},
    {"free_bulk", (PyCFunction)Core_free_bulk, METH_VARARGS,
     "free_bulk(int64 pfns, cpu) -> how many order-0 pages were freed before a bad one"},
    {"drain_all_pages", (PyCFunction)Core_drain_all_pages, METH_NOARGS, "drain_all_pages()"},
    {"churn_step", (PyCFunction)Core_churn_step, METH_VARARGS,
     "Churn.step in C: see pool.guest.workload"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pool.guest._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled paths of one PageAllocator, over its arrays.",
    .tp_new = Core_new,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

/* hazard_flags(state u8, ram bool, attr u8, vm_private u16, vm_shared u16, pfns int64)
 * -> (fatal, benign, unknown) among the pfns: pool.guest.hazards.HazardCounts._flags for a
 * page array, in one pass where numpy makes five gathers and a dozen temporaries (a vmalloc
 * conversion takes it twice, before and after, on its 4096 pages). Its reference is the
 * Python expression there; Guest.check_invariants compares the counts it keeps with a full
 * scan (hazards.check) and tests/test_hazard_flags.py drives both. */
static PyObject *core_hazard_flags(PyObject *self, PyObject *args) {
    Py_buffer b[6];
    int got = 0;
    PyObject *out = NULL;
    for (int i = 0; i < 6; i++) b[i].obj = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]))
        return NULL;
    got = 6;
    const uint8_t *state = b[0].buf, *ram = b[1].buf, *attr = b[2].buf;
    const uint16_t *vp = b[3].buf, *vs = b[4].buf;
    const int64_t *pfns = b[5].buf;
    if (b[3].len % 2 || b[4].len % 2 || b[5].len % 8) {
        PyErr_SetString(PyExc_ValueError, "hazard_flags: uint16 counters and int64 pfns expected");
        goto done;
    }
    Py_ssize_t limit = b[0].len;
    if (b[1].len < limit) limit = b[1].len;
    if (b[2].len < limit) limit = b[2].len;
    if (b[3].len / 2 < limit) limit = b[3].len / 2;
    if (b[4].len / 2 < limit) limit = b[4].len / 2;
    long long fatal = 0, benign = 0, unknown = 0;
    Py_ssize_t n = b[5].len / 8;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t p = pfns[i];
        if (p < 0 || p >= limit) {
            PyErr_Format(PyExc_IndexError, "pfn %lld outside the arrays", (long long)p);
            goto done;
        }
        uint8_t s = state[p];
        if (s == 1) /* PAGE_SHARED: a private alias or a private vmalloc mapping is fatal */
            fatal += (ram[p] && attr[p] == 0) || vp[p] > 0;
        else if (s == 0) /* PAGE_PRIVATE: a shared alias or mapping is recoverable */
            benign += (ram[p] && attr[p] == 1) || vs[p] > 0;
        else
            unknown++;
    }
    out = Py_BuildValue("LLL", fatal, benign, unknown);
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return out;
}

static PyMethodDef module_methods[] = {
    {"hazard_flags", core_hazard_flags, METH_VARARGS,
     "hazard_flags(state, ram, attr, vm_private, vm_shared, pfns) -> (fatal, benign, unknown)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef coremodule = {
    PyModuleDef_HEAD_INIT, "pool.guest._core",
    "The compiled page-allocator core (see pool.guest.buddy).", -1, module_methods, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
