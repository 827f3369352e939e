/* Holding back Python-level signal handlers while the at-fork hooks run.
 *
 * CPython runs a Python-level signal handler in the main thread only, but any
 * thread that does not block the signal may receive it: its C-level handler
 * sets a flag, and the main thread then runs the Python handler at the next
 * bytecode -- inside an at-fork hook, if one is running, where what the
 * handler raises is printed as "Exception ignored" and lost. So while the
 * hooks run, every signal whose C-level handler is CPython's gets a recorder
 * instead; afterwards CPython's handler is put back and each signal that
 * arrived meanwhile is delivered to it.
 */
#ifndef FASTFORK_SIGHOLD_H
#define FASTFORK_SIGHOLD_H

/* Swap the C-level handler of every signal whose handler is `python_handler`
 * (CPython's) for a recorder. Nested calls do nothing until the outer release. */
void ff_hold_signals(void (*python_handler)(int));

/* Undo ff_hold_signals: put CPython's handler back wherever the recorder is
 * still installed (a handler set meanwhile stays), then call deliver(sig) for
 * each signal that arrived (deliver NULL: forget them, as a forked child does). */
void ff_release_signals(int (*deliver)(int));

#endif
