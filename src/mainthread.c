/* Making the forking thread the child's main thread for CPython's signal delivery; see mainthread.h. */
#define Py_BUILD_CORE_MODULE 1
#include <Python.h>

#include "mainthread.h"

#if PY_VERSION_HEX >= 0x030D0000
#include "internal/pycore_runtime.h"
#endif

void ff_adopt_main_thread(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    _PyRuntime.main_tstate = PyThreadState_Get();
#endif
}
