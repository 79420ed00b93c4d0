// Qwen-Image node pack: small on-node helpers (no build step; the host's stable extension API only).
//  - latent / edit nodes: megapixels, DiT tokens, and a warning when a size is off the model's grid;
//  - Edit Encode, after a run: the sizes of the images the vision tower (VL) and the VAE received (the previews
//    themselves come through the host's standard "images" output);
//  - loaders, after loading: variant, weight format, parameters and memory.
// Widget values may be inputs or missing (node.widgets can be undefined in current frontends): everything guards.
import { app } from "../../scripts/app.js";

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

export function latentLines(nodeId, node) {
  const [tokenSide, multiple] = LATENT_NODES[nodeId];
  const preset = widgetValue(node, "preset");
  let size = preset !== undefined && !String(preset).startsWith("custom") ? parseSize(preset) : null;
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
    // the nearest multiple, ties to even: the size the node's own message suggests (Python's round)
    const snap = (v) => {
      const q = v / multiple, low = Math.floor(q);
      const n = q - low === 0.5 ? (low % 2 === 0 ? low : low + 1) : Math.round(q);
      return Math.max(multiple, n * multiple);
    };
    lines.push({ text: `⚠ not a multiple of ${multiple}: use ${snap(width)}×${snap(height)}`, color: WARN });
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

function drawLines(node, ctx, lines) {
  if (!lines.length || node.flags?.collapsed || !Array.isArray(node.size)) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  lines.forEach((line, i) => {
    ctx.fillStyle = line.color;
    ctx.fillText(line.text, 6, node.size[1] + 14 + 13 * i);  // under the node, clear of its widgets
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
      chain(nodeType.prototype, "onDrawForeground", function (ctx) { drawLines(this, ctx, latentLines(id, this)); });
    } else if (AREA_NODES.has(id)) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        this.qipSizes = Array.isArray(message?.qip_sizes) ? message.qip_sizes : undefined;
        this.setDirtyCanvas?.(true, true);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawLines(this, ctx, this.qipSizes ? sizeLines(this.qipSizes) : areaLines(this));
      });
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
