/* Making the forking thread the child's main thread for CPython's signal delivery.
 *
 * CPython 3.13 marks a received signal on the eval breaker of
 * _PyRuntime.main_tstate, the thread state of the thread that started the
 * interpreter. A child forked from any other thread inherits that pointer
 * (PyOS_AfterFork_Child does not update it) while fork has deleted the thread
 * state it points to: the child's Python-level signal handlers then run only
 * when some C code happens to check for signals (a sleep interrupted by the
 * signal), never between bytecodes. Older versions keep the flag per
 * interpreter and are not affected.
 */
#ifndef FASTFORK_MAINTHREAD_H
#define FASTFORK_MAINTHREAD_H

/* In a forked child, with the GIL held and every signal blocked: point
 * CPython's main thread state at the calling thread's. Does nothing where
 * CPython does not need it. */
void ff_adopt_main_thread(void);

#endif
