/* Holding back Python-level signal handlers while the at-fork hooks run; see sighold.h.
 *
 * Only the main thread (the one where Python handlers run) holds signals, one
 * fork at a time. The recorder may run in any thread, and late: the kernel
 * can hand a signal to another thread while the recorder is installed and
 * that thread run it after the release. So a signal goes from the recorder
 * to Python exactly once, through an atomic flag per signal that whoever
 * sees it last -- the release, or a recorder running after it -- clears
 * and delivers. The recorder does only async-signal-safe work (lock-free
 * atomics and PyErr_SetInterruptEx, which CPython documents as such).
 */
#include "sighold.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>

#ifdef _NSIG
#define FF_NSIG _NSIG
#else
#define FF_NSIG NSIG
#endif

static int depth;                           /* nested holds (a hook that forks) */
static struct sigaction saved[FF_NSIG];     /* CPython's handler, to put back */
static unsigned char holding[FF_NSIG];
static atomic_int held;                     /* between hold and release */
static atomic_int arrived[FF_NSIG];
static int (*_Atomic deliver_late)(int);

static void record(int sig)
{
    int saved_errno = errno;
    int (*deliver)(int);

    if (sig > 0 && sig < FF_NSIG) {
        atomic_store(&arrived[sig], 1);
        if (!atomic_load(&held) && atomic_exchange(&arrived[sig], 0)) {
            deliver = atomic_load(&deliver_late);
            if (deliver != NULL)
                deliver(sig);
        }
    }
    errno = saved_errno;
}

void ff_hold_signals(void (*python_handler)(int))
{
    struct sigaction recorder;
    int sig;

    if (depth++ > 0)
        return;
    atomic_store(&held, 1);
    for (sig = 1; sig < FF_NSIG; sig++) {
        holding[sig] = 0;
        if (sigaction(sig, NULL, &saved[sig]) != 0 || (saved[sig].sa_flags & SA_SIGINFO)
                || saved[sig].sa_handler != python_handler)
            continue;
        recorder = saved[sig];
        recorder.sa_handler = record;
        if (sigaction(sig, &recorder, NULL) == 0)
            holding[sig] = 1;
    }
}

void ff_release_signals(int (*deliver)(int))
{
    struct sigaction now;
    int sig;

    if (depth == 0 || --depth > 0)
        return;
    for (sig = 1; sig < FF_NSIG; sig++) {
        if (holding[sig] && sigaction(sig, NULL, &now) == 0
                && !(now.sa_flags & SA_SIGINFO) && now.sa_handler == record)
            sigaction(sig, &saved[sig], NULL);  /* a handler set meanwhile stays */
        holding[sig] = 0;
    }
    atomic_store(&deliver_late, deliver);
    atomic_store(&held, 0);
    for (sig = 1; sig < FF_NSIG; sig++) {
        if (atomic_exchange(&arrived[sig], 0) && deliver != NULL)
            deliver(sig);
    }
}
