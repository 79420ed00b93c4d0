// Drives the host's real ComfyUI frontend in headless Chromium for tests/test_browser.py.
//
//   node tests/browser/drive.mjs JOB.json RESULT.json
//
// JOB: {url, chromium, chromium_args, playwright_core, artifacts, pack, timeout_s, steps: [{kind, ...}]}.
// One browser, one page; the steps run in order on it and each reports {kind, ok, error, ms, data, shots}.  Every
// console message of type error / warning and every uncaught page error is reported with the step it came in.
// Only the host (job.url) is reachable from the page: any other request is aborted and listed in "blocked".
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [jobPath, resultPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const { chromium } = createRequire(import.meta.url)(job.playwright_core);
const result = { steps: [], console: [], blocked: [], ready_ms: null };
const save = () => fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
let step = "startup";

async function shot(page, entry, name) {
  const file = path.join(job.artifacts, `${name.replace(/[^\w.-]+/g, "_")}.png`);
  await page.screenshot({ path: file });
  entry.shots.push(file);
}

// Helpers in the page (window.qipTest): what the steps share.
function installHelpers() {
  const closeDialogs = () => {
    for (const button of document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-dialog-header-close")) {
      button.click();
    }
  };
  window.qipTest = {
    // Visible dialogs (missing nodes, load errors ...): their text.
    dialogs() {
      return [...document.querySelectorAll(".p-dialog")].filter((d) => d.offsetParent !== null)
        .map((d) => d.innerText.trim().slice(0, 2000));
    },
    closeDialogs,
    // What a node's onDrawForeground writes (our extension's lines), drawn with the page's real 2D context.
    drawnText(node) {
      const real = window.app.canvas.ctx;
      const texts = [];
      const ctx = new Proxy(real, {
        get(target, key) {
          if (key === "fillText") return (text, ...rest) => { texts.push(String(text)); return target.fillText(text, ...rest); };
          const value = target[key];
          return typeof value === "function" ? value.bind(target) : value;
        },
        set(target, key, value) { target[key] = value; return true; },
      });
      real.save();
      try {
        node.onDrawForeground?.(ctx, window.app.canvas, window.app.canvas.canvas);
      } finally {
        real.restore();
      }
      return texts;
    },
    widgets(node) {
      return Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value]));
    },
    // A node alone on a fresh canvas at 1:1, in view.
    async freshNode(type) {
      await window.app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                       config: {}, extra: {}, version: 0.4 }, true, false, null,
                                     { showMissingNodesDialog: false, showMissingModelsDialog: false });
      const node = window.LiteGraph.createNode(type);
      if (!node) throw new Error(`the frontend cannot create ${type}`);
      window.app.graph.add(node);
      node.pos = [400, 300];  // clear of the tab bar and the side bars (the selection toolbox sits above it)
      window.app.canvas.ds.offset = [0, 0];
      window.app.canvas.ds.scale = 1;
      window.app.canvas.setDirty(true, true);
      return node;
    },
  };
}

const frame = (page) => page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => resolve())));

const STEPS = {
  // Every template of the pack from the host's list, loaded the way the template browser loads one.
  async templates(page, spec, entry) {
    const names = await page.evaluate(async (pack) => {
      const listed = await (await fetch("/api/workflow_templates")).json();
      return listed[pack] ?? null;
    }, job.pack);
    if (!names) throw new Error(`the host lists no templates for ${job.pack}`);
    const loaded = {};
    for (const name of names) {
      loaded[name] = await page.evaluate(async ({ pack, name }) => {
        const workflow = await (await fetch(`/api/workflow_templates/${pack}/${name}.json`)).json();
        const registered = window.LiteGraph.registered_node_types;
        const missing = workflow.nodes.filter((n) => !(n.type in registered)).map((n) => n.type);
        await window.app.loadGraphData(workflow, true, true, name, { showMissingModelsDialog: false });
        const nodes = window.app.graph.nodes;
        // Load Image shows its picture: the frontend adds the preview widget once the image is decoded, and the
        // node grows to hold it when next drawn.  Wait for that (15 s at most), then two more frames.
        const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
        const images = nodes.filter((n) => n.type === "LoadImage");
        const previewed = (n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth)
          && n.widgets?.some((w) => w.name === "$$canvas-image-preview");
        for (const until = Date.now() + 15_000; Date.now() < until && !images.every(previewed);) {
          window.app.canvas.setDirty(true, true);
          await nextFrame();
        }
        for (let i = 0; i < 2; i++) {
          window.app.canvas.setDirty(true, true);
          await nextFrame();
        }
        return {
          expected: workflow.nodes.length,
          missing,
          types: nodes.map((n) => n.type),
          // a node the frontend could not build keeps no widgets though its definition has some
          broken: nodes.filter((n) => n.has_errors).map((n) => `${n.id}:${n.type}`),
          dialogs: window.qipTest.dialogs(),
          // where each node sits once drawn (pos: the body's top left; the title bar is above it), its input
          // sockets (widget inputs aside) and its preview's images; each link's two ends as the canvas draws them
          layout: nodes.map((n) => ({ id: n.id, type: n.type, pos: Array.from(n.pos), size: Array.from(n.size),
                                      previews: n.imgs?.length ?? 0,
                                      sockets: n.inputs.filter((i) => !i.widget).map((i) => i.name) })),
          links: [...window.app.graph.links.values()].map((link) => ({
            id: link.id, origin: link.origin_id, target: link.target_id,
            start: Array.from(window.app.graph.getNodeById(link.origin_id).getOutputPos(link.origin_slot)),
            end: Array.from(window.app.graph.getNodeById(link.target_id).getInputPos(link.target_slot)),
          })),
          title_height: window.LiteGraph.NODE_TITLE_HEIGHT,
        };
      }, { pack: job.pack, name });
      await frame(page);
      await shot(page, entry, `template-${name}`);
      await page.evaluate(() => window.qipTest.closeDialogs());
    }
    return loaded;
  },

  // A preset picked the way the combo menu picks one (widget.setValue: value, then the widget's callback).
  async preset(page, spec, entry) {
    const data = await page.evaluate(async ({ type, widthStart, heightStart }) => {
      const node = await window.qipTest.freshNode(type);
      const find = (name) => node.widgets.find((w) => w.name === name);
      const preset = find("preset");
      const pick = (value) => {
        if (typeof preset.setValue === "function") {
          preset.setValue(value, { e: undefined, node, canvas: window.app.canvas });
        } else {
          preset.value = value;
          preset.callback?.(value, window.app.canvas, node, [0, 0], undefined);
        }
      };
      const created = window.qipTest.widgets(node);
      // start from a custom size, then walk every option the node definition offers (its last: custom)
      pick(preset.options.values.find((v) => String(v).startsWith("custom")));
      find("width").value = widthStart;
      find("height").value = heightStart;
      const picks = [];
      for (const value of preset.options.values) {
        pick(value);
        picks.push({ preset: value, widgets: window.qipTest.widgets(node), drawn: window.qipTest.drawnText(node) });
      }
      // then custom at an off-grid size, as typed into the fields: drawn with the node's warning
      find("width").value = widthStart;
      find("height").value = heightStart;
      const offGrid = { widgets: window.qipTest.widgets(node), drawn: window.qipTest.drawnText(node) };
      return { created, options: preset.options.values, picks, offGrid, node: node.id };
    }, { type: spec.node, widthStart: spec.width, heightStart: spec.height });
    // the picker's last real preset, on screen
    await page.evaluate(({ id, value }) => {
      const node = window.app.graph.getNodeById(id);
      node.widgets.find((w) => w.name === "preset").setValue?.(value, { node, canvas: window.app.canvas });
      window.app.canvas.setDirty(true, true);
    }, { id: data.node, value: data.options.find((v) => !String(v).startsWith("custom")) });
    await frame(page);
    await shot(page, entry, `preset-${spec.node}`);
    return data;
  },

  // An API graph loaded into the frontend (app.loadApiJson), queued by the frontend (app.queuePrompt), and what
  // the listed nodes show once the host's "executed" messages reached the page.
  async run(page, spec, entry) {
    const outcome = await page.evaluate(async ({ graph, timeoutMs }) => {
      const api = window.comfyAPI.api.api;
      window.qipTest.closeDialogs();
      window.app.loadApiJson(graph, "browser-test.json");
      const executed = [];
      const onExecuted = (event) => executed.push(String(event.detail?.display_node ?? event.detail?.node));
      api.addEventListener("executed", onExecuted);
      const finished = new Promise((resolve) => {
        const done = (status) => (event) => resolve({ status, prompt_id: event.detail?.prompt_id ?? null,
                                                      detail: status === "success" ? null : event.detail });
        api.addEventListener("execution_success", done("success"), { once: true });
        api.addEventListener("execution_error", done("error"), { once: true });
        api.addEventListener("execution_interrupted", done("interrupted"), { once: true });
      });
      const timer = new Promise((resolve) => setTimeout(() => resolve({ status: "timeout" }), timeoutMs));
      await window.app.queuePrompt(0, 1);
      const status = await Promise.race([finished, timer]);
      api.removeEventListener("executed", onExecuted);
      return { ...status, executed, client_id: api.clientId };
    }, { graph: spec.graph, timeoutMs: (spec.timeout_s ?? 300) * 1000 });
    if (outcome.status !== "success") throw new Error(`the run ended with ${JSON.stringify(outcome).slice(0, 4000)}`);
    // previews: the frontend loads each image output as an <img>; wait until they are decoded
    await page.waitForFunction((ids) => ids.every((id) => {
      const node = window.app.graph.getNodeById(id);
      const want = window.app.nodeOutputs?.[id]?.images?.length ?? 0;
      return !want || (node?.imgs?.length === want && node.imgs.every((img) => img.complete && img.naturalWidth));
    }), spec.nodes, { timeout: 30_000 }).catch(() => {});  // reported below as what is there
    const nodes = await page.evaluate((ids) => Object.fromEntries(ids.map((id) => {
      const node = window.app.graph.getNodeById(id);
      if (!node) return [id, null];
      return [id, {
        type: node.type,
        qipSizes: node.qipSizes ?? null,
        qipBadge: node.qipBadge ?? null,
        outputImages: window.app.nodeOutputs?.[id]?.images ?? null,
        imgs: (node.imgs ?? []).map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight })),
        drawn: window.qipTest.drawnText(node),
      }];
    })), spec.nodes);
    for (const id of spec.shots ?? []) {
      await page.evaluate((id) => {
        const canvas = window.app.canvas;
        const node = window.app.graph.getNodeById(id);
        canvas.ds.scale = 1;
        canvas.centerOnNode?.(node);
        canvas.setDirty(true, true);
      }, id);
      await frame(page);
      await frame(page);
      await shot(page, entry, `run-node-${id}`);
    }
    return { ...outcome, nodes };
  },

  // The frontend's node help: select the node, press the selection toolbox's info button, read the help panel.
  async help(page, spec, entry) {
    const fetched = [];
    const listen = (response) => {
      if (response.url().includes("/docs/")) fetched.push({ url: response.url(), status: response.status() });
    };
    page.on("response", listen);
    try {
      await page.evaluate(async (type) => {
        const node = await window.qipTest.freshNode(type);
        const canvas = window.app.canvas;
        canvas.deselectAll?.();
        if (typeof canvas.selectNode === "function") canvas.selectNode(node);
        else canvas.select(node);
        window.app.canvas.setDirty(true, true);
      }, spec.node);
      await frame(page);
      const info = page.locator('[data-testid="info-button"]');
      await info.first().click({ timeout: 15_000 });
      const panel = page.getByText(spec.expect, { exact: false }).first();
      await panel.waitFor({ state: "visible", timeout: 15_000 });
      const text = await panel.evaluate((el) => {
        let box = el;  // the help page's container: the nearest ancestor holding the page's sections
        for (let i = 0; i < 6 && box.parentElement && box.innerText.length < 400; i++) box = box.parentElement;
        return box.innerText;
      });
      await shot(page, entry, `help-${spec.node}`);
      return { fetched, text };
    } finally {
      page.off("response", listen);
    }
  },
};

// Last: the steps above are defined by now.
const userData = fs.mkdtempSync(path.join(os.tmpdir(), "qip-chromium-"));
const deadline = setTimeout(() => {  // never outlive the test's patience: report what we have and leave
  result.error = `timed out after ${job.timeout_s} s in step ${step}`;
  save();
  fs.rmSync(userData, { recursive: true, force: true });
  process.exit(3);
}, job.timeout_s * 1000);
let context = null;
try {
  context = await chromium.launchPersistentContext(userData, {
    executablePath: job.chromium, headless: true, args: job.chromium_args, viewport: { width: 1600, height: 1000 },
    timeout: 60_000,
  });
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(job.url) || url.startsWith("data:") || url.startsWith("blob:")) return route.continue();
    result.blocked.push(url);
    return route.abort();
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") {
      result.console.push({ step, type: message.type(), text: message.text(), url: message.location()?.url ?? "" });
    }
  });
  page.on("pageerror", (error) => result.console.push({ step, type: "pageerror", text: String(error?.stack ?? error),
                                                         url: "" }));
  const started = Date.now();
  await page.goto(job.url, { waitUntil: "load" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph
                                   && window.comfyAPI?.api?.api, null, { timeout: 90_000 });
  await page.evaluate(installHelpers);
  result.ready_ms = Date.now() - started;
  result.extensions = await page.evaluate(() => (window.app.extensions ?? []).map((e) => e.name));

  for (const [index, spec] of job.steps.entries()) {
    step = `${index}:${spec.kind}`;
    const entry = { kind: spec.kind, ok: false, error: null, ms: 0, data: null, shots: [] };
    const t0 = Date.now();
    try {
      entry.data = await STEPS[spec.kind](page, spec, entry);
      entry.ok = true;
    } catch (error) {
      entry.error = String(error?.stack ?? error);
      await shot(page, entry, `${index}-${spec.kind}-failed`).catch(() => {});
    }
    entry.ms = Date.now() - t0;
    result.steps.push(entry);
  }
} catch (error) {
  result.error = String(error?.stack ?? error);
} finally {
  clearTimeout(deadline);
  save();
  await context?.close().catch(() => {});
  fs.rmSync(userData, { recursive: true, force: true });
}
