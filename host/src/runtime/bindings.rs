//! Host-side bindings of the `stem:task/task` world, generated in this one place.

wasmtime::component::bindgen!({
    world: "task",
    path: "../wit",
    imports: { default: async },
    exports: { default: async },
});
