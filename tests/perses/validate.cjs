// Validates Perses dashboards with Perses' own code: the zod schemas and vocabularies that
// @perses-dev/core ships (what the Perses UI checks a dashboard against), not a copy of them.
//
//   node tests/perses/validate.cjs FILE.json...
//
// Each FILE holds one document: a plain `kind: Dashboard` or a `perses.dev/v1alpha2` PersesDashboard
// CR (its dashboard spec under spec.config). Prints {"<file>": ["problem", ...]} as JSON and exits 1
// when any file has a problem, 0 otherwise.
//
// What @perses-dev/core covers: metadata names, durations, display, panel and variable definitions
// (zod; unknown keys are reported too, since zod would silently drop them), layout references
// (resolvePanelRef), and inside the plugin specs the legend modes and positions, units,
// calculations and table transforms Perses knows. The plugin specs' own CUE schemas are not on
// npm; tests/test_dashboards.py checks their keys against the plugins' CUE files.
'use strict';

const fs = require('fs');
const core = require('@perses-dev/core');

// The keys of `value` that `parsed` (zod's output, which keeps only keys the schema knows) lacks.
// Below a plugin's `spec` the schema is a record of anything: that part is the plugin's own.
function unknownKeys(value, parsed, path, problems) {
  if (value === null || typeof value !== 'object' || parsed === null || typeof parsed !== 'object') return;
  for (const key of Object.keys(value)) {
    if (!(key in parsed)) {
      problems.push(`${path}.${key}: not a field Perses knows`);
    } else {
      unknownKeys(value[key], parsed[key], `${path}.${key}`, problems);
    }
  }
}

function check(schema, value, path, problems) {
  const result = schema.safeParse(value);
  if (!result.success) {
    for (const issue of result.error.issues) {
      problems.push(`${[path, ...issue.path].join('.')}: ${issue.message}`);
    }
    return;
  }
  unknownKeys(value, result.data, path, problems);
}

// Every `format` object inside a plugin spec (yAxis.format, format, columnSettings[].format).
function formats(value, path, found) {
  if (value === null || typeof value !== 'object') return found;
  for (const [key, child] of Object.entries(value)) {
    if (key === 'format' && child && typeof child === 'object' && !Array.isArray(child)) found.push([`${path}.format`, child]);
    formats(child, `${path}.${key}`, found);
  }
  return found;
}

function checkPluginSpec(panelPath, plugin, problems) {
  const spec = plugin.spec || {};
  const path = `${panelPath}.spec.plugin.spec`;
  if (spec.legend !== undefined) {
    if (spec.legend.position !== undefined && !core.isValidLegendPosition(spec.legend.position)) {
      problems.push(`${path}.legend.position: ${JSON.stringify(spec.legend.position)} is not a legend position`);
    }
    if (spec.legend.mode !== undefined && !core.isValidLegendMode(spec.legend.mode)) {
      problems.push(`${path}.legend.mode: ${JSON.stringify(spec.legend.mode)} is not a legend mode`);
    }
  }
  for (const [formatPath, format] of formats(spec, path, [])) {
    if (format.unit !== undefined && !(format.unit in core.UNIT_CONFIG)) {
      problems.push(`${formatPath}.unit: ${JSON.stringify(format.unit)} is not a Perses unit`);
    }
  }
  if (plugin.kind === 'StatChart' || plugin.kind === 'GaugeChart') {
    if (!(spec.calculation in core.CalculationsMap)) {
      problems.push(`${path}.calculation: ${JSON.stringify(spec.calculation)} is not a calculation (required for ${plugin.kind})`);
    }
  }
  for (const [index, transform] of (spec.transforms || []).entries()) {
    if (!(transform.kind in core.TRANSFORM_TEXT)) {
      problems.push(`${path}.transforms.${index}.kind: ${JSON.stringify(transform.kind)} is not a transform`);
    }
  }
}

function validateSpec(spec, path, problems) {
  check(core.displaySchema, spec.display || {}, `${path}.display`, problems);
  for (const key of ['duration', 'refreshInterval']) {
    if (spec[key] !== undefined) check(core.durationValidationSchema, spec[key], `${path}.${key}`, problems);
  }
  const panels = spec.panels || {};
  for (const [key, panel] of Object.entries(panels)) {
    const panelPath = `${path}.panels.${key}`;
    check(core.nameSchema, key, `${panelPath} (key)`, problems);
    check(core.panelDefinitionSchema, panel, panelPath, problems);
    if (panel && panel.spec && panel.spec.plugin) checkPluginSpec(panelPath, panel.spec.plugin, problems);
  }
  const names = new Set();
  for (const [index, variable] of (spec.variables || []).entries()) {
    const variablePath = `${path}.variables.${index}`;
    check(core.variableDefinitionSchema, variable, variablePath, problems);
    const name = variable && variable.spec && variable.spec.name;
    if (names.has(name)) problems.push(`${variablePath}.spec.name: ${JSON.stringify(name)} is defined twice`);
    names.add(name);
  }
  const placed = new Set();
  for (const [index, layout] of (spec.layouts || []).entries()) {
    if (layout.kind !== 'Grid') problems.push(`${path}.layouts.${index}.kind: only Grid is generated here`);
    for (const [itemIndex, item] of ((layout.spec || {}).items || []).entries()) {
      const itemPath = `${path}.layouts.${index}.spec.items.${itemIndex}`;
      try {
        core.resolvePanelRef({ panels }, item.content);
        placed.add(core.getPanelKeyFromRef(item.content));
      } catch (error) {
        problems.push(`${itemPath}.content: ${error.message}`);
      }
    }
  }
  for (const key of Object.keys(panels)) {
    if (!placed.has(key)) problems.push(`${path}.panels.${key}: in no layout`);
  }
}

function validate(document) {
  const problems = [];
  if (document.kind === 'Dashboard') {
    check(core.projectMetadataSchema, document.metadata, 'metadata', problems);
    validateSpec(document.spec || {}, 'spec', problems);
  } else if (document.kind === 'PersesDashboard') {
    if (document.apiVersion !== 'perses.dev/v1alpha2') problems.push('apiVersion: expected perses.dev/v1alpha2');
    check(core.nameSchema, (document.metadata || {}).name, 'metadata.name', problems);
    validateSpec((document.spec || {}).config || {}, 'spec.config', problems);
  } else {
    problems.push(`kind: ${JSON.stringify(document.kind)} is not Dashboard or PersesDashboard`);
  }
  return problems;
}

const report = {};
for (const file of process.argv.slice(2)) {
  report[file] = validate(JSON.parse(fs.readFileSync(file, 'utf8')));
}
process.stdout.write(JSON.stringify(report, null, 1) + '\n');
process.exit(Object.values(report).some((problems) => problems.length) ? 1 : 0);
