/*
 * cowtree._fuse_ops: lseek and fallocate handlers for the libfuse session
 * that pyfuse3 creates.
 *
 * pyfuse3 3.5 fills in no `lseek` and no `fallocate` member of the struct
 * fuse_lowlevel_ops that it passes to fuse_session_new(), so the kernel
 * applies its generic rule to SEEK_DATA and SEEK_HOLE, and fallocate(2)
 * fails with EOPNOTSUPP.  This module defines fuse_session_new() itself.
 * Once cowtree/fuse.py has loaded it into the global symbol scope (before
 * pyfuse3 is imported), the dynamic linker binds pyfuse3's reference to
 * this definition, which copies the caller's operations, sets `lseek` and
 * `fallocate` to the trampolines below, and calls libfuse's own
 * fuse_session_new().  libfuse copies the struct, so a stack copy is enough.
 *
 * The trampolines run in the thread that called fuse_session_process_buf()
 * (pyfuse3's main loop), take the GIL, call the Python handler registered
 * with set_handlers() synchronously, and reply before they return.
 *
 * libfuse 3.17 turned fuse_session_new() into a macro over a versioned
 * function, and a pyfuse3 built against those headers references that
 * other symbol.  With such headers this module builds without the
 * definition, and interposed() stays False.
 */

/* Python.h comes first and defines _GNU_SOURCE, which dlvsym() needs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <string.h>

#if FUSE_VERSION < FUSE_MAKE_VERSION(3, 8)
/* The lseek operation and fuse_reply_lseek() arrived in libfuse 3.8. */
#define COWTREE_INTERPOSE 0
#define COWTREE_NO_INTERPOSE_REASON "libfuse headers older than 3.8 have no lseek operation"
#elif FUSE_VERSION >= FUSE_MAKE_VERSION(3, 17) || defined(fuse_session_new)
#define COWTREE_INTERPOSE 0
#define COWTREE_NO_INTERPOSE_REASON "libfuse headers 3.17 or newer make fuse_session_new a macro"
#else
#define COWTREE_INTERPOSE 1
#define COWTREE_NO_INTERPOSE_REASON ""
#endif

/* The Python handlers, or NULL: lseek(ino, fh, off, whence) and
 * fallocate(ino, fh, mode, offset, length).  Both are read and replaced
 * only with the GIL held. */
static PyObject *lseek_handler;
static PyObject *fallocate_handler;

/* Set once the session was created through this module's fuse_session_new(). */
static int session_interposed;

/* The libfuse soname whose fuse_session_new() this module calls. */
#define LIBFUSE_SONAME "libfuse3.so.3"

#if COWTREE_INTERPOSE

/*
 * Log the current Python exception through logging.getLogger("cowtree.fuse")
 * with its traceback, and clear it.  Falls back to stderr when logging fails.
 */
static void
log_exception(const char *operation)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL)
        PyException_SetTraceback(value, traceback);

    int logged = 0;
    PyObject *logging = PyImport_ImportModule("logging");
    PyObject *logger = logging ? PyObject_CallMethod(logging, "getLogger", "s", "cowtree.fuse") : NULL;
    PyObject *method = logger ? PyObject_GetAttrString(logger, "error") : NULL;
    PyObject *args = method ? Py_BuildValue("(ss)", "%s handler raised an unexpected exception; replied EIO",
                                            operation) : NULL;
    PyObject *kwargs = args ? Py_BuildValue("{s:O}", "exc_info", value ? value : Py_None) : NULL;
    if (kwargs != NULL) {
        PyObject *result = PyObject_Call(method, args, kwargs);
        logged = result != NULL;
        Py_XDECREF(result);
    }
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    Py_XDECREF(method);
    Py_XDECREF(logger);
    Py_XDECREF(logging);
    if (!logged) {
        PyErr_Clear();
        PySys_WriteStderr("cowtree._fuse_ops: %s handler raised an unexpected exception; replied EIO\n",
                          operation);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/*
 * Return the errno that the pending exception carries in an int `errno`
 * attribute above 0 (OSError, pyfuse3.FUSEError), clearing the exception;
 * return 0 and leave the exception pending otherwise.
 */
static int
errno_of_exception(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    int err = 0;
    if (value != NULL && PyObject_HasAttrString(value, "errno")) {
        PyObject *attr = PyObject_GetAttrString(value, "errno");
        if (attr != NULL && PyLong_Check(attr)) {
            long number = PyLong_AsLong(attr);
            if (number > 0 && number < 4096)
                err = (int)number;
        }
        Py_XDECREF(attr);
        PyErr_Clear();
    }
    if (err) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return err;
    }
    PyErr_Restore(type, value, traceback);
    return 0;
}

/*
 * Call handler(*args) and reply to req.  An int of 0 or more is success:
 * lseek replies with it as the offset, fallocate with no error, which None
 * also means for fallocate.  A negative int is a negated errno.  An
 * exception with an errno attribute replies that errno.  Any other
 * exception, or a result of another type, replies EIO and is logged.
 * Steals the reference to args.
 */
static void
call_and_reply(fuse_req_t req, PyObject *handler, PyObject *args, const char *operation, int reply_offset)
{
    if (handler == NULL) {
        /* ENOSYS makes the kernel stop asking and use its own behaviour. */
        Py_XDECREF(args);
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (args == NULL) {
        log_exception(operation);
        fuse_reply_err(req, EIO);
        return;
    }
    Py_INCREF(handler);
    PyObject *result = PyObject_CallObject(handler, args);
    Py_DECREF(handler);
    Py_DECREF(args);

    if (result == NULL) {
        int err = errno_of_exception();
        if (!err) {
            log_exception(operation);
            err = EIO;
        }
        fuse_reply_err(req, err);
        return;
    }

    /* fallocate may return None; lseek must return an offset. */
    if (!PyLong_Check(result) && (result != Py_None || reply_offset)) {
        PyErr_Format(PyExc_TypeError, "%s handler returned %R, expected %s", operation, result,
                     reply_offset ? "an int" : "None or an int");
        Py_DECREF(result);
        log_exception(operation);
        fuse_reply_err(req, EIO);
        return;
    }
    long long value = 0;
    if (result != Py_None) {
        value = PyLong_AsLongLong(result);
        if (value == -1 && PyErr_Occurred()) {
            Py_DECREF(result);
            log_exception(operation);
            fuse_reply_err(req, EIO);
            return;
        }
    }
    Py_DECREF(result);

    if (value < 0)
        fuse_reply_err(req, value < -4095 ? EIO : (int)-value);
    else if (reply_offset)
        fuse_reply_lseek(req, (off_t)value);
    else
        fuse_reply_err(req, 0);
}

static void
lseek_trampoline(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(KKLi)", (unsigned long long)ino, (unsigned long long)(fi ? fi->fh : 0),
                                   (long long)off, whence);
    call_and_reply(req, lseek_handler, args, "lseek", 1);
    PyGILState_Release(gil);
}

static void
fallocate_trampoline(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                     struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(KKiLL)", (unsigned long long)ino, (unsigned long long)(fi ? fi->fh : 0),
                                   mode, (long long)offset, (long long)length);
    call_and_reply(req, fallocate_handler, args, "fallocate", 0);
    PyGILState_Release(gil);
}

typedef struct fuse_session *(*session_new_function)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                     size_t, void *);

/*
 * Return libfuse's own fuse_session_new(), looked up in the already loaded
 * libfuse3.so.3 itself, so that this definition is never found again.
 */
static session_new_function
libfuse_session_new(void)
{
    static session_new_function found;
    if (found != NULL)
        return found;
    void *library = dlopen(LIBFUSE_SONAME, RTLD_NOLOAD | RTLD_NOW);
    if (library == NULL)
        return NULL;
    void *symbol = dlvsym(library, "fuse_session_new", "FUSE_3.0");
    if (symbol == NULL)
        symbol = dlsym(library, "fuse_session_new");
    /* The library stays loaded: this module links against it. */
    dlclose(library);
    if (symbol == NULL || symbol == (void *)&fuse_session_new)
        return NULL;
    found = (session_new_function)symbol;
    return found;
}

__attribute__((visibility("default"))) struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size, void *userdata)
{
    session_new_function real = libfuse_session_new();
    if (real == NULL) {
        fprintf(stderr, "cowtree._fuse_ops: libfuse's fuse_session_new not found in " LIBFUSE_SONAME "\n");
        return NULL;
    }
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof ops);
    memcpy(&ops, op, op_size < sizeof ops ? op_size : sizeof ops);
    ops.lseek = lseek_trampoline;
    ops.fallocate = fallocate_trampoline;
    struct fuse_session *session = real(args, &ops, sizeof ops, userdata);
    if (session != NULL)
        session_interposed = 1;
    return session;
}

#endif /* COWTREE_INTERPOSE */

/* -- the Python module ------------------------------------------------------------ */

static void
store_handler(PyObject **slot, PyObject *handler)
{
    PyObject *old = *slot;
    *slot = handler == Py_None ? NULL : Py_NewRef(handler);
    Py_XDECREF(old);
}

static PyObject *
set_handlers(PyObject *module, PyObject *args)
{
    PyObject *lseek, *fallocate;
    if (!PyArg_ParseTuple(args, "OO:set_handlers", &lseek, &fallocate))
        return NULL;
    if (lseek != Py_None && !PyCallable_Check(lseek))
        return PyErr_Format(PyExc_TypeError, "lseek handler must be callable or None, not %.100s",
                            Py_TYPE(lseek)->tp_name);
    if (fallocate != Py_None && !PyCallable_Check(fallocate))
        return PyErr_Format(PyExc_TypeError, "fallocate handler must be callable or None, not %.100s",
                            Py_TYPE(fallocate)->tp_name);
    store_handler(&lseek_handler, lseek);
    store_handler(&fallocate_handler, fallocate);
    Py_RETURN_NONE;
}

static PyObject *
interposed(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(session_interposed);
}

static PyMethodDef methods[] = {
    {"set_handlers", set_handlers, METH_VARARGS,
     "set_handlers(lseek, fallocate)\n--\n\n"
     "Set the handlers the session's lseek and fallocate requests call, each a callable or None.\n\n"
     "lseek(ino, fh, off, whence) returns the new offset; fallocate(ino, fh, mode, offset, length)\n"
     "returns None.  Either may raise an exception with an errno attribute or return a negated\n"
     "errno; any other exception replies EIO and is logged.  Without a handler the request\n"
     "replies ENOSYS, and the kernel falls back to its generic behaviour for good."},
    {"interposed", interposed, METH_NOARGS,
     "interposed()\n--\n\n"
     "Return True once a FUSE session was created through this module's fuse_session_new(),\n"
     "which adds the lseek and fallocate operations."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cowtree._fuse_ops",
    .m_doc = "lseek and fallocate handlers for the libfuse session that pyfuse3 creates.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fuse_ops(void)
{
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "LIBFUSE_VERSION", FUSE_VERSION) < 0 ||
        PyModule_AddObjectRef(module, "INTERPOSITION_BUILT", COWTREE_INTERPOSE ? Py_True : Py_False) < 0 ||
        PyModule_AddStringConstant(module, "NO_INTERPOSITION_REASON", COWTREE_NO_INTERPOSE_REASON) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
