// Qwen-Image node pack: small on-node helpers (no build step; the host's stable extension API only).
//  - latent / edit nodes: megapixels, DiT tokens, and a warning when a size is off the model's grid;
//  - Empty Latent: picking an aspect preset copies its size (on the model's grid) into width / height, so the
//    custom fields start from it; the sizes come from the node's own preset labels (the host's object_info);
//  - Edit Encode, after a run: the sizes of the images the vision tower (VL) and the VAE received (the previews
//    themselves come through the host's standard "images" output);
//  - loaders, after loading: variant, weight format, parameters and memory;
//  - Apply EliGen Entities, after a run: the entities' prompts in the colours of their regions in its preview.
// Widget values may be inputs or missing (node.widgets can be undefined in current frontends): everything guards.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const LATENT_NODES = {
  // node id: [pixels per DiT token side, the multiple the node requires]
  QIP_EmptyLatent: [16, 16],
  QIP_21EmptyLatent: [16, 32],
};
const AREA_NODES = new Set(["QIP_EditLatent", "QIP_EditEncode"]);
const LOADERS = new Set([
  "QIP_DiffusionModelLoader", "QIP_TextEncoderLoader", "QIP_VAELoader",
  "QIP_21DiffusionModelLoader", "QIP_21TextEncoderLoader", "QIP_21VAELoader",
]);
const ELIGEN_APPLY = "QIP_EliGenApply";
const WARN = "#e8a33d";
const TEXT = "#9aa4ad";

function widgetValue(node, name) {
  const widgets = Array.isArray(node?.widgets) ? node.widgets : [];
  const widget = widgets.find((w) => w && w.name === name);
  return widget ? widget.value : undefined;
}

function parseSize(text) {
  const match = /(\d+)\s*[x×]\s*(\d+)/.exec(String(text ?? ""));
  return match ? [Number(match[1]), Number(match[2])] : null;
}

function megapixels(pixels) {
  return (pixels / 1e6).toFixed(2) + " MP";
}

// The nearest multiple, ties to even: the size the node's own message suggests (Python's round).
function snap(value, multiple) {
  const q = value / multiple, low = Math.floor(q);
  const n = q - low === 0.5 ? (low % 2 === 0 ? low : low + 1) : Math.round(q);
  return Math.max(multiple, n * multiple);
}

// The size a preset label names ("1664x928 (16:9)"), or null for "custom ..." and anything without a size.
export function presetSize(value) {
  return value === undefined || String(value).startsWith("custom") ? null : parseSize(value);
}

// Copies the picked preset's size, snapped to the node's grid, into its width / height widgets (when it has them).
// Returns the size set, or null when the preset is custom (the fields stay as the user left them).
export function applyPreset(nodeId, node, value) {
  const size = presetSize(value);
  const widgets = Array.isArray(node?.widgets) ? node.widgets : [];
  const width = widgets.find((w) => w && w.name === "width");
  const height = widgets.find((w) => w && w.name === "height");
  if (!size || !width || !height) return null;
  const multiple = LATENT_NODES[nodeId][1];
  const snapped = size.map((side) => snap(side, multiple));
  width.value = snapped[0];
  height.value = snapped[1];
  node.setDirtyCanvas?.(true, true);
  return snapped;
}

export function latentLines(nodeId, node) {
  const [tokenSide, multiple] = LATENT_NODES[nodeId];
  const preset = widgetValue(node, "preset");
  let size = presetSize(preset);
  if (!size) {
    const width = Number(widgetValue(node, "width"));
    const height = Number(widgetValue(node, "height"));
    if (!Number.isFinite(width) || !Number.isFinite(height) || width <= 0 || height <= 0) return [];
    size = [width, height];
  }
  const [width, height] = size;
  const tokens = Math.floor(width / tokenSide) * Math.floor(height / tokenSide);
  const lines = [{ text: `${width}×${height} · ${megapixels(width * height)} · ${tokens} tokens`, color: TEXT }];
  if (width % multiple || height % multiple) {
    lines.push({ text: `⚠ not a multiple of ${multiple}: use ${snap(width, multiple)}×${snap(height, multiple)}`,
                 color: WARN });
  }
  return lines;
}

export function areaLines(node) {
  const area = widgetValue(node, "area");
  const multiple = Number(widgetValue(node, "size_multiple"));
  if (area === undefined) return [];
  const size = parseSize(area);
  const lines = [];
  if (size) {
    const pixels = size[0] * size[1];
    lines.push({ text: `≈ ${megapixels(pixels)} · ≈ ${Math.round(pixels / 256)} tokens per image`, color: TEXT });
  } else {
    lines.push({ text: "each image at its own area", color: TEXT });
  }
  if (Number.isFinite(multiple) && multiple % 16) {
    lines.push({ text: `⚠ size_multiple ${multiple} is not a multiple of 16`, color: WARN });
  }
  return lines;
}

export function sizeLines(sizes) {
  if (!Array.isArray(sizes) || !sizes.length) return [];
  const part = (role, label) => sizes.filter((s) => s && s.role === role)
    .map((s) => `${label} ${Number(s.index) + 1}: ${s.width}×${s.height}`);
  return [...part("vl", "VL"), ...part("vae", "VAE")].map((text) => ({ text, color: TEXT }));
}

export function badgeLine(badge) {
  if (!badge || typeof badge !== "object") return [];
  const parts = [badge.variant, badge.format];
  const params = Number(badge.parameters);
  if (Number.isFinite(params) && params > 0) {
    parts.push(params >= 1e9 ? `${(params / 1e9).toFixed(1)} B params`
      : params >= 1e6 ? `${(params / 1e6).toFixed(1)} M params` : `${params} params`);
  }
  const bytes = Number(badge.bytes);
  if (Number.isFinite(bytes) && bytes > 0) {
    parts.push(bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GB` : `${(bytes / 2 ** 20).toFixed(1)} MB`);
  }
  return [{ text: parts.filter(Boolean).join(" · "), color: TEXT }];
}

export function entityLines(entities) {
  // Apply EliGen Entities, after a run: each entity's prompt in the colour of its region in the preview
  if (!Array.isArray(entities)) return [];
  return entities.filter((e) => e && typeof e === "object").map((e, i) => {
    const prompt = String(e.prompt ?? "").replace(/\s+/g, " ").trim();
    const short = prompt.length > 48 ? `${prompt.slice(0, 47)}…` : prompt;
    return { text: `■ ${i + 1}: ${short}`, color: /^#[0-9a-f]{6}$/i.test(String(e.colour)) ? e.colour : TEXT };
  });
}

function drawLines(node, ctx, lines) {
  // node.size is a typed array in current frontends (a plain array in older ones and in the tests' stand-in)
  const height = Number(node.size?.[1]);
  if (!lines.length || node.flags?.collapsed || !Number.isFinite(height)) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  lines.forEach((line, i) => {
    ctx.fillStyle = line.color;
    ctx.fillText(line.text, 6, height + 14 + 13 * i);  // under the node, clear of its widgets
  });
  ctx.restore();
}

function chain(prototype, method, extra) {
  const original = prototype[method];
  prototype[method] = function (...args) {
    const result = original?.apply(this, args);
    try {
      extra.apply(this, args);
    } catch (error) {
      console.warn("qwen_image.ui:", method, error);
    }
    return result;
  };
}

app.registerExtension({
  name: "qwen_image.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const id = nodeData?.name;
    if (!id || !nodeType?.prototype) return;
    if (id in LATENT_NODES) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        const node = this;
        const preset = (Array.isArray(node.widgets) ? node.widgets : []).find((w) => w && w.name === "preset");
        if (!preset) return;  // QIP_21EmptyLatent: width / height only
        const original = preset.callback;
        preset.callback = function (value, ...rest) {
          const result = original?.apply(this, [value, ...rest]);
          try {
            applyPreset(id, node, value ?? preset.value);
          } catch (error) {
            console.warn("qwen_image.ui: preset", error);
          }
          return result;
        };
        applyPreset(id, node, preset.value);  // a new node: its fields show its default preset's size
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) { drawLines(this, ctx, latentLines(id, this)); });
    } else if (AREA_NODES.has(id)) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        this.qipSizes = Array.isArray(message?.qip_sizes) ? message.qip_sizes : undefined;
        this.setDirtyCanvas?.(true, true);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawLines(this, ctx, this.qipSizes ? sizeLines(this.qipSizes) : areaLines(this));
      });
    } else if (id === ELIGEN_APPLY) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        this.qipEntities = Array.isArray(message?.qip_entities) ? message.qip_entities : undefined;
        this.setDirtyCanvas?.(true, true);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) { drawLines(this, ctx, entityLines(this.qipEntities)); });
    } else if (LOADERS.has(id)) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        const badge = Array.isArray(message?.qip_badge) ? message.qip_badge[0] : undefined;
        if (badge) this.qipBadge = badge;
        this.setDirtyCanvas?.(true, true);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) { drawLines(this, ctx, badgeLine(this.qipBadge)); });
    }
  },
});
