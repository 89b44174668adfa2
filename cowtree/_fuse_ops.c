/*
 * cowtree._fuse_ops: lseek and fallocate handlers for the libfuse session
 * that pyfuse3 creates.
 *
 * pyfuse3 3.5 fills in no `lseek` and no `fallocate` member of the struct
 * fuse_lowlevel_ops that it passes to fuse_session_new(), so the kernel
 * applies its generic rule to SEEK_DATA and SEEK_HOLE, and fallocate(2)
 * fails with EOPNOTSUPP.  This module defines fuse_session_new() itself.
 * cowtree/fuse.py loads it into the global symbol scope before it imports
 * pyfuse3, so the dynamic linker binds pyfuse3's reference to this
 * definition.  The definition copies the caller's operations, sets `lseek`
 * and `fallocate` to the trampolines below, and calls libfuse's own
 * fuse_session_new().  libfuse copies the struct, so a stack copy is enough.
 *
 * The trampolines run in the thread that called fuse_session_process_buf()
 * (pyfuse3's main loop), take the GIL, call the Python handler registered
 * with set_handlers() synchronously, and reply before they return, unless
 * the fallocate handler took the reply over with defer_reply().  Then a
 * Reply object sends it later, so a long fallocate can run in pieces while
 * pyfuse3 goes on handling other requests.
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

/* The request whose handler is running and may call defer_reply(), or NULL.
 * request_deferred is set when the handler did.  Both are used only with
 * the GIL held. */
static fuse_req_t deferrable_request;
static int request_deferred;

/*
 * A reply that a handler took over with defer_reply().  send() replies to
 * the request once.  A Reply dropped unsent replies EIO, so that the
 * caller does not wait until the unmount.  Every Reply must be sent or
 * dropped before the session is destroyed (pyfuse3.close()), because
 * libfuse frees the request's session there.
 */
typedef struct {
    PyObject_HEAD
    fuse_req_t request;     /* NULL once the reply was sent */
} ReplyObject;

static PyObject *
reply_send(ReplyObject *self, PyObject *arg)
{
    long err = PyLong_AsLong(arg);
    if (err == -1 && PyErr_Occurred())
        return NULL;
    if (err < 0 || err > 4095)
        return PyErr_Format(PyExc_ValueError, "invalid errno %ld: expected 0 (success) to 4095", err);
    if (self->request == NULL)
        return PyErr_Format(PyExc_RuntimeError, "the reply to this request was already sent");
    fuse_req_t request = self->request;
    self->request = NULL;
    fuse_reply_err(request, (int)err);
    Py_RETURN_NONE;
}

static PyObject *
reply_sent(ReplyObject *self, void *closure)
{
    return PyBool_FromLong(self->request == NULL);
}

static void
reply_dealloc(ReplyObject *self)
{
    if (self->request != NULL) {
        PySys_WriteStderr("cowtree._fuse_ops: a deferred reply was dropped without being sent; replied EIO\n");
        fuse_reply_err(self->request, EIO);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef reply_methods[] = {
    {"send", (PyCFunction)reply_send, METH_O,
     "send(err)\n--\n\n"
     "Reply to the request: 0 for success, or an errno.  A second call raises RuntimeError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef reply_getset[] = {
    {"sent", (getter)reply_sent, NULL, "True once the reply was sent.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReplyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cowtree._fuse_ops.Reply",
    .tp_doc = "The reply to one request, taken over with defer_reply(); only defer_reply() creates one.",
    .tp_basicsize = sizeof(ReplyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)reply_dealloc,
    .tp_methods = reply_methods,
    .tp_getset = reply_getset,
};

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
 * With deferrable set, the handler may call defer_reply(); then it owns
 * the reply, and its result is ignored.  Steals the reference to args.
 */
static void
call_and_reply(fuse_req_t req, PyObject *handler, PyObject *args, const char *operation, int reply_offset,
               int deferrable)
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
    deferrable_request = deferrable ? req : NULL;
    request_deferred = 0;
    PyObject *result = PyObject_CallObject(handler, args);
    int deferred = request_deferred;
    deferrable_request = NULL;
    request_deferred = 0;
    Py_DECREF(handler);
    Py_DECREF(args);

    if (deferred) {
        /* The Reply object that defer_reply() returned replies, or replies EIO when it is dropped. */
        if (result == NULL)
            log_exception(operation);
        Py_XDECREF(result);
        return;
    }
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
    call_and_reply(req, lseek_handler, args, "lseek", 1, 0);
    PyGILState_Release(gil);
}

static void
fallocate_trampoline(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                     struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(KKiLL)", (unsigned long long)ino, (unsigned long long)(fi ? fi->fh : 0),
                                   mode, (long long)offset, (long long)length);
    call_and_reply(req, fallocate_handler, args, "fallocate", 0, 1);
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
defer_reply(PyObject *module, PyObject *unused)
{
    if (deferrable_request == NULL)
        return PyErr_Format(PyExc_RuntimeError,
                            "defer_reply() must be called from a fallocate handler, at most once per request");
    ReplyObject *reply = PyObject_New(ReplyObject, &ReplyType);
    if (reply == NULL)
        return NULL;
    reply->request = deferrable_request;
    deferrable_request = NULL;
    request_deferred = 1;
    return (PyObject *)reply;
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
     "errno; any other exception replies EIO and is logged.  The fallocate handler may instead\n"
     "call defer_reply() and reply later.  Without a handler the request replies ENOSYS, and\n"
     "the kernel falls back to its generic behaviour for good."},
    {"defer_reply", defer_reply, METH_NOARGS,
     "defer_reply()\n--\n\n"
     "Take over the reply to the fallocate request whose handler is running, and return a Reply.\n\n"
     "The request then gets no reply when the handler returns; Reply.send(err) sends it later.\n"
     "Raises RuntimeError outside a fallocate handler or on a second call for one request."},
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
    if (PyType_Ready(&ReplyType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Reply", (PyObject *)&ReplyType) < 0 ||
        PyModule_AddIntConstant(module, "LIBFUSE_VERSION", FUSE_VERSION) < 0 ||
        PyModule_AddObjectRef(module, "INTERPOSITION_BUILT", COWTREE_INTERPOSE ? Py_True : Py_False) < 0 ||
        PyModule_AddStringConstant(module, "NO_INTERPOSITION_REASON", COWTREE_NO_INTERPOSE_REASON) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
