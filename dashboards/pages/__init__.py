"""One module per page: ``layout(...)`` builds the page from the store, ``register(app, ...)``
adds the callbacks that refresh it while a study runs."""
