"""Run the data loading of the next steps while the current one trains: prefetch(iterator, fn) yields fn(item)
for each item, in order, computed on one background thread, at most `depth` items ahead.

    for batch in prefetch(batches(...), lambda step: load(step), depth=2): ...

fn runs outside the training thread; reading files and torch copies release the GIL, so the two overlap. The
thread starts at the first next(), is a daemon (it never keeps the process alive), and an exception in the
iterator or in fn is re-raised in the consumer, at the position of the item that failed. When the consumer
stops (break, close(), or the generator is garbage-collected) the thread is told to stop and joined: it finishes
at most the one fn call it is in, and never touches the iterator again.
"""
import queue
import sys
import threading

_END = object()  # the iterator is exhausted


def prefetch(iterator, fn, depth=2):
    q = queue.Queue(maxsize=depth)  # (ok, value): ok False -> value is the exception to raise
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put((True, fn(item)))  # blocks while `depth` results wait
                if stop.is_set():
                    return
            q.put((True, _END))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((False, e))

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if not ok:
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        try:  # make room: the worker may be blocked in put(); after that put it sees `stop`
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        if not sys.is_finalizing():  # at interpreter exit daemon threads are frozen: joining one could hang
            thread.join()
